"""A named deployment as trigger generation and the benign matrix see it: what it computes, and how far the harmless
changes of its own configuration move that.

Why *within* the deployment: a label-only verifier queries the deployment as it runs. What it must tolerate is
what the deployment itself varies from one query to the next (its batch sizes, threads, graph optimisations and
memory format, all in its own precision), not the gap between its arithmetic and another one. A bf16 server
computes other logits than torch in fp32, but the same ones, up to that jitter, every time: triggers whose
margins are measured in bf16 and kept above bf16's own jitter stay on their key there, however far fp32 is.

    arith = arithmetic("onnxruntime", model, meta)
    jitter = arith.jitter(images)                   # {"per_setting", "max", "logit_scale", "deployment"}
    delta = calibrate_delta(jitter, safety, arith.eps)
"""
import os
from dataclasses import dataclass
from typing import Callable

from ..watermark.jitter import DEFAULT_BATCH_SIZES, channels_last_copy, max_abs_jitter
from .targets import DEPLOYMENTS, predictor


@dataclass
class Arithmetic:
    """One named deployment of one model: ``predict`` (uint8 images -> CPU fp32 logits, all at once unless a batch
    size is given), ``variants`` (built on demand: (setting, predictor) for each harmless change of the
    deployment's configuration) and ``eps``, the machine epsilon it computes in."""
    name: str
    predict: Callable
    variants: Callable
    eps: float

    def jitter(self, images, batch_sizes=DEFAULT_BATCH_SIZES):
        """measure_within on this deployment (what trigger generation calls: it cannot import this package)."""
        return measure_within(self, images, batch_sizes)


def arithmetic(name, model, meta):
    """The deployment ``name`` of ``model`` (``meta`` as load_classifier returns it); an ONNX deployment exports
    once and builds every variant from that one file."""
    deployment = DEPLOYMENTS[name]
    onnx_bytes = None
    if deployment.runtime != "torch":
        from .onnx_export import export_bytes
        onnx_bytes = export_bytes(model, meta)
    many = os.cpu_count() or 1
    threads = sorted({1, many})

    def variants():
        found = [(f"{t} thread{'s' if t > 1 else ''}", predictor(name, model, meta, threads=t, onnx_bytes=onnx_bytes))
                 for t in threads]
        if deployment.runtime == "torch":
            found.append(("channels_last", predictor(name, channels_last_copy(model), meta)))
        if deployment.runtime == "onnxruntime":
            found += [(f"graph optimizations {level}", predictor(name, model, meta, optimizations=level,
                                                                 onnx_bytes=onnx_bytes)) for level in ("basic", "none")]
        return found
    return Arithmetic(name, predictor(name, model, meta, onnx_bytes=onnx_bytes), variants, deployment.eps)


def within_settings(arith, images, batch_sizes=DEFAULT_BATCH_SIZES):
    """(setting, logits) for every harmless change within the deployment: other batch sizes, then each variant of its
    configuration, all at once. The reference is ``arith.predict(images)``: all at once, the runtime's defaults."""
    n = max(1, len(images))
    settings = [(f"batch size {bs}", arith.predict(images, bs)) for bs in batch_sizes if bs < n]
    return settings + [(name, predict(images)) for name, predict in arith.variants()]


def measure_within(arith, images, batch_sizes=DEFAULT_BATCH_SIZES):
    """The largest logit difference from the deployment's own reference under each of its harmless changes, in the
    shape jitter.measure_jitter returns (so calibrate_delta reads either)."""
    reference = arith.predict(images)
    per_setting = {name: max_abs_jitter(logits, reference) for name, logits in within_settings(arith, images,
                                                                                               batch_sizes)}
    return {"per_setting": per_setting, "max": max(per_setting.values(), default=0.0),
            "logit_scale": reference.abs().max().item() if len(reference) else 0.0, "deployment": arith.name}
