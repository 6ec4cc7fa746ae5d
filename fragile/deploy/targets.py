"""The named deployments: each turns a loaded checkpoint into what that deployment computes, a predictor from uint8
images (N, C, H, W) to CPU fp32 logits, so that verification runs in the deployment's own arithmetic.

    torch-fp32        today's verifier: torch on the CPU, exact fp32 (no TF32)
    torch-fp16/bf16   the same weights and inputs cast to half precision (jitter.CastModel), as model.half() serves
    onnxruntime       the checkpoint exported to ONNX (in memory) and run by ONNX Runtime on the CPU
    openvino          the same ONNX model compiled by OpenVINO for the CPU, pinned to fp32
    torch-cuda-*, onnxruntime-cuda   the same on a GPU (one error line where there is none)

A trigger set is calibrated for some of them (``calibrated_for``): a verdict through another one gets a warning
line, since its arithmetic may move triggers that sit closer to a boundary than its jitter.
"""
from dataclasses import dataclass
from typing import Callable

from ..watermark.jitter import DEFAULT_ENVELOPE, PRECISIONS
from .predictors import onnx_predictor, torch_predictor
from .runtimes import openvino_model, ort_session, require_gpu


@dataclass(frozen=True)
class Deployment:
    """A named deployment: ``build(model, meta)`` -> predictor; ``gpu`` when it needs one."""
    build: Callable
    gpu: bool = False


def _torch(dtype, cuda=False):
    def build(model, meta):
        if cuda:
            require_gpu("a torch-cuda deployment")
            model = model.to("cuda")
        return torch_predictor(model, dtype)
    return build


def _onnxruntime(cuda=False):
    def build(model, meta):
        from .onnx_export import export_bytes
        if cuda:
            require_gpu("the onnxruntime-cuda deployment")
        return onnx_predictor(ort_session(export_bytes(model, meta), cuda=cuda))
    return build


def _openvino(model, meta):
    from .onnx_export import export_bytes
    return onnx_predictor(openvino_model(export_bytes(model, meta)))


DEPLOYMENTS = {
    "torch-fp32": Deployment(_torch(None)),
    "torch-fp16": Deployment(_torch(PRECISIONS["fp16"])),
    "torch-bf16": Deployment(_torch(PRECISIONS["bf16"])),
    "onnxruntime": Deployment(_onnxruntime()),
    "openvino": Deployment(_openvino),
    "torch-cuda-fp32": Deployment(_torch(None, cuda=True), gpu=True),
    "torch-cuda-fp16": Deployment(_torch(PRECISIONS["fp16"], cuda=True), gpu=True),
    "torch-cuda-bf16": Deployment(_torch(PRECISIONS["bf16"], cuda=True), gpu=True),
    "onnxruntime-cuda": Deployment(_onnxruntime(cuda=True), gpu=True),
}
DEFAULT_DEPLOYMENT = "torch-fp32"


def predictor(name, model, meta):
    """The predictor of deployment ``name`` for a loaded checkpoint."""
    return DEPLOYMENTS[name].build(model, meta)


# The envelope entries trigger metadata has always recorded, and the deployments each one calibrated.
ENVELOPE_DEPLOYMENTS = {"exact": ("torch-fp32",), "fp16": ("torch-fp16",), "bf16": ("torch-bf16",)}
CUDA_TWINS = {"torch-fp32": "torch-cuda-fp32", "torch-fp16": "torch-cuda-fp16", "torch-bf16": "torch-cuda-bf16"}


def calibrated_for(trigger_meta):
    """The deployments a trigger set was calibrated for: its metadata's ``deployments`` where it records them, else
    derived from its ``envelope`` (absent: the default envelope); with ``cuda`` in the envelope the GPU twins too.
    ONNX Runtime and OpenVINO are never derived: only a set calibrated through them lists them."""
    if isinstance(trigger_meta.get("deployments"), list):
        return [d for d in trigger_meta["deployments"] if isinstance(d, str)]
    envelope = trigger_meta.get("envelope") or list(DEFAULT_ENVELOPE)
    found = [d for entry in envelope for d in ENVELOPE_DEPLOYMENTS.get(entry, ())]
    if "cuda" in envelope:
        found += [CUDA_TWINS[d] for d in found]
    return list(dict.fromkeys(found))


def calibration_warning(deployment, trigger_meta):
    """The warning line printed beside a verdict through a deployment the triggers were not calibrated for, or None."""
    calibrated = calibrated_for(trigger_meta)
    if deployment in calibrated:
        return None
    return (f"warning: these triggers were calibrated for {', '.join(calibrated) or 'no named deployment'}, not for "
            f"{deployment}: its arithmetic may move a trigger near a boundary, so a TAMPERED verdict may be a false "
            f"alarm (calibrate triggers for this deployment)")
