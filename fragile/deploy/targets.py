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
import copy
from dataclasses import dataclass

import torch

from ..watermark.jitter import DEFAULT_ENVELOPE, PRECISIONS
from .predictors import onnx_predictor, torch_predictor
from ..core.cli import UserError
from .runtimes import openvino_model, ort_session, require, require_gpu


@dataclass(frozen=True)
class Deployment:
    """A named deployment: the ``runtime`` that computes it (torch, onnxruntime, openvino), the precision it computes
    in (``dtype``, None for fp32; its machine epsilon is the floor of a jitter measured as zero) and whether it runs
    on a GPU."""
    runtime: str
    dtype: torch.dtype = None
    gpu: bool = False

    @property
    def eps(self):
        return torch.finfo(self.dtype or torch.float32).eps


DEPLOYMENTS = {
    "torch-fp32": Deployment("torch"),
    "torch-fp16": Deployment("torch", PRECISIONS["fp16"]),
    "torch-bf16": Deployment("torch", PRECISIONS["bf16"]),
    "onnxruntime": Deployment("onnxruntime"),
    "openvino": Deployment("openvino"),
    "torch-cuda-fp32": Deployment("torch", gpu=True),
    "torch-cuda-fp16": Deployment("torch", PRECISIONS["fp16"], gpu=True),
    "torch-cuda-bf16": Deployment("torch", PRECISIONS["bf16"], gpu=True),
    "onnxruntime-cuda": Deployment("onnxruntime", gpu=True),
}
DEFAULT_DEPLOYMENT = "torch-fp32"


RUNTIME_MODULES = {"torch": (), "onnxruntime": ("onnx", "onnxruntime"), "openvino": ("onnx", "openvino")}


def parse_names(values, flag="--deploy"):
    """Deployment names from a flag's values, each one name or several joined by commas; each checked now (known,
    its GPU present, its runtime installed), one error line before any work."""
    names = list(dict.fromkeys(n.strip() for value in values for n in str(value).split(",") if n.strip()))
    for name in names:
        if name not in DEPLOYMENTS:
            raise UserError(f"{flag}: unknown deployment {name!r}: choose from {', '.join(DEPLOYMENTS)}")
        if DEPLOYMENTS[name].gpu:
            require_gpu(f"{flag} {name}")
        for module in RUNTIME_MODULES[DEPLOYMENTS[name].runtime]:
            require(module)
    return names


def predictor(name, model, meta, threads=None, optimizations="all", onnx_bytes=None):
    """The predictor of deployment ``name`` for a loaded checkpoint. ``threads`` and ``optimizations`` (ONNX Runtime's
    graph optimisation level) are the deployer's own settings, None and "all" the runtimes' defaults; ``onnx_bytes``
    reuses an export already made of ``model``."""
    deployment = DEPLOYMENTS[name]
    if deployment.gpu:
        require_gpu(f"the {name} deployment")
    if deployment.runtime == "torch":
        on_gpu = deployment.gpu and next(model.parameters()).device.type != "cuda"
        return torch_predictor(copy.deepcopy(model).to("cuda") if on_gpu else model, deployment.dtype, threads)
    from .onnx_export import export_bytes
    data = onnx_bytes if onnx_bytes is not None else export_bytes(model, meta)
    if deployment.runtime == "onnxruntime":
        return onnx_predictor(ort_session(data, cuda=deployment.gpu, threads=threads, optimizations=optimizations))
    return onnx_predictor(openvino_model(data, threads=threads))


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
