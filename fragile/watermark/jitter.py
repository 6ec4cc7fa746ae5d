"""Benign jitter: how far a harmless deployment change moves an untouched model's logits.

Triggers that sit close to a decision boundary are only useful if nothing *harmless* moves them across it.
The deployment envelope (``generate_samples.py --envelope``) names the benign changes an owner accepts;
``benign_settings`` evaluates the model under each -- another batch size, thread count, memory format,
device, half precision, a checkpoint save/load round trip, PNG instead of tensor triggers -- and
``measure_jitter`` reports the largest logit difference from the reference (all at once, fp32, default
threads). Trigger generation turns that into delta, the smallest margin a trigger may keep:
``delta = safety factor x the largest jitter measured`` (``calibrate_delta``). The benign-change matrix
(fragile.tamper.benign) runs the same settings on a deployed trigger set and counts false alarms.

``exact`` is the fp32 envelope this suite always ran; fp16 and bf16 are half-precision inference of the
same weights, whose logits move by orders of magnitude more.
"""
import contextlib
import copy
import os
import tempfile

import torch

from ..core.cli import UserError
from ..core.devices import cudnn_benchmark, tf32
from ..core.io import load_classifier, save_classifier
from ..core.training import predict_logits

ENVELOPE_ENTRIES = ("exact", "fp16", "bf16", "batch", "threads", "channels_last", "cuda")
EXACT_ENTRIES = ("batch", "threads", "channels_last")
PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16}
# The default keeps what delta has always been calibrated on, so no method changes unless asked to.
DEFAULT_ENVELOPE = ("exact",)


def resolve_envelope(envelope, strict=True):
    """The envelope's entries with ``exact`` expanded into what it has always meant: fp32 under other batch
    sizes, thread counts, channels_last, and (where a GPU is present) CPU vs GPU. ``cuda`` without a GPU is
    a user error when ``strict`` (calibration: a jitter that cannot be measured here cannot calibrate delta);
    otherwise (the matrix on a recorded envelope) it is left out, and the caller says so."""
    entries = list(envelope or DEFAULT_ENVELOPE)
    unknown = [e for e in entries if e not in ENVELOPE_ENTRIES]
    if unknown:
        raise UserError(f"unknown envelope entry {unknown[0]!r}: choose from {', '.join(ENVELOPE_ENTRIES)}")
    if "cuda" in entries and not torch.cuda.is_available():
        if strict:
            raise UserError("envelope entry 'cuda' needs a GPU, and torch.cuda.is_available() is false here: "
                            "drop it, or calibrate on a machine with a GPU")
        entries = [e for e in entries if e != "cuda"] or list(DEFAULT_ENVELOPE)
    resolved = []
    for entry in entries:
        expanded = EXACT_ENTRIES + (("cuda",) if torch.cuda.is_available() else ()) if entry == "exact" else (entry,)
        resolved += [e for e in expanded if e not in resolved]
    return tuple(resolved)


class CastModel(torch.nn.Module):
    """A copy of ``model`` whose weights and inputs are cast to ``dtype`` (how a half-precision deployment
    serves it: ``model.half()``, no autocast), returning fp32 logits. The serving runtime uses it too."""

    def __init__(self, model, dtype):
        super().__init__()
        self.dtype = dtype
        self.inner = copy.deepcopy(model).to(dtype)

    def forward(self, x):
        return self.inner(x.to(self.dtype)).float()


DEFAULT_BATCH_SIZES = (1, 16)     # compared with "all triggers at once"
# An fp32 logit of magnitude L cannot be trusted below a few ulps of L: the floor for the jitter when the
# measured jitter happens to be 0 (a deterministic CPU where every setting hits the same kernels).
ULP_FLOOR_FACTOR = 4


# ----------------------------------------------------------------------------- the settings

@contextlib.contextmanager
def torch_threads(n):
    """Run a block with ``n`` intra-op threads, restoring the previous count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def reference_logits(model, images):
    """The logits every setting is compared with: all images at once, fp32, no TF32, default threads."""
    with tf32(False):
        return predict_logits(model, images, max(1, len(images))).cpu()


def channels_last_copy(model):
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


def benign_settings(model, images, batch_sizes=DEFAULT_BATCH_SIZES, model_meta=None, alternatives=None,
                    envelope=DEFAULT_ENVELOPE):
    """(name, kind, entry, thunk) for every harmless change of the ``envelope`` that applies here; each thunk
    returns CPU fp32 logits, and ``entry`` names the envelope entry the setting belongs to.

    ``kind`` is "protocol" for changes the verifier must tolerate, or "raw-tf32" for TF32 logits that
    the verifier never sees (query_labels pins fp32) but that are worth reporting.
    ``alternatives`` maps a name to other uint8 images of the same triggers (e.g. the tensor file
    beside the PNGs); they must give the reference logits too. The checkpoint round trip and the
    alternatives are in every envelope: they must be bit-exact whatever the deployment.
    """
    entries = set(resolve_envelope(envelope))
    device = next(model.parameters()).device
    n = max(1, len(images))
    settings = []
    if "batch" in entries:
        settings += [(f"batch size {bs}", "protocol", "batch", lambda bs=bs: _logits(model, images, bs))
                     for bs in batch_sizes if bs < n]
    many = os.cpu_count() or 1
    if "threads" in entries:
        settings.append(("1 thread", "protocol", "threads", lambda: _with_threads(1, model, images, n)))
        if many > 1:
            settings.append((f"{many} threads", "protocol", "threads", lambda: _with_threads(many, model, images, n)))
    if "channels_last" in entries:
        settings.append(("channels_last", "protocol", "channels_last",
                         lambda: _logits(channels_last_copy(model), images, n)))
    if model_meta is not None:
        settings.append(("checkpoint round trip", "protocol", "exact",
                         lambda: _logits(_round_trip(model, model_meta), images, n)))
    for name, other in (alternatives or {}).items():
        settings.append((name, "protocol", "exact", lambda other=other: _logits(model, other.to(device), n)))
    if "cuda" in entries:
        settings.extend(_cross_device_settings(model, images, n))
    for precision in PRECISIONS:
        if precision in entries:
            settings.extend(_precision_settings(model, images, precision, batch_sizes if "batch" in entries else (),
                                                "cuda" in entries))
    return settings


def _logits(model, images, batch_size):
    with tf32(False):
        return predict_logits(model, images, batch_size).cpu()


def _with_threads(threads, model, images, batch_size):
    with torch_threads(threads):
        return _logits(model, images, batch_size)


def _round_trip(model, model_meta):
    device = next(model.parameters()).device
    with tempfile.TemporaryDirectory(prefix="fragile-benign-") as folder:
        path = os.path.join(folder, "round_trip.pt")
        save_classifier(path, model, model_meta)
        loaded, _ = load_classifier(path, device)
    return loaded


def _cross_device_settings(model, images, n):
    """CPU vs GPU, channels_last, cuDNN autotuning on and off, and TF32 on the GPU: only when a GPU is present."""
    if not torch.cuda.is_available():
        return []
    device = next(model.parameters()).device
    other = torch.device("cpu") if device.type == "cuda" else torch.device("cuda")
    gpu_model = model if device.type == "cuda" else copy.deepcopy(model).to("cuda")
    settings = [(f"on {other.type}", "protocol", "cuda",
                 lambda: _logits(copy.deepcopy(model).to(other), images.to(other), n)),
                ("gpu channels_last", "protocol", "cuda", lambda: _logits(channels_last_copy(gpu_model), images.cuda(), n))]

    def benchmark_logits(enabled):
        with cudnn_benchmark(enabled):
            return _logits(gpu_model, images.cuda(), n)
    settings += [(f"gpu cudnn.benchmark {'on' if on else 'off'}", "protocol", "cuda",
                  lambda on=on: benchmark_logits(on)) for on in (True, False)]

    def tf32_logits():
        with tf32(True):
            return predict_logits(gpu_model, images.cuda(), n).cpu()
    settings.append(("gpu tf32 (raw, never used by the verifier)", "raw-tf32", "cuda", tf32_logits))
    return settings


def _precision_settings(model, images, precision, batch_sizes, with_gpu):
    """fp16 or bf16 inference, all triggers at once and at each of ``batch_sizes``, on the model's device and,
    with ``with_gpu`` and a GPU present, on the other device too."""
    device, n = next(model.parameters()).device, max(1, len(images))
    devices = [device]
    if with_gpu and torch.cuda.is_available():
        devices.append(torch.device("cpu") if device.type == "cuda" else torch.device("cuda"))
    settings = []
    for target in devices:
        where = "" if target == device else f" on {target.type}"
        for bs in (n, *[b for b in batch_sizes if b < n]):
            label = f"{precision}{where}" + ("" if bs == n else f", batch size {bs}")
            settings.append((label, "protocol", precision,
                             lambda target=target, bs=bs: _logits(CastModel(model, PRECISIONS[precision]).to(target),
                                                                  images.to(target), bs)))
    return settings


# ----------------------------------------------------------------------------- jitter and delta

def max_abs_jitter(logits, reference):
    return (logits.double() - reference.double()).abs().max().item() if len(reference) else 0.0


def measure_jitter(model, images, batch_sizes=DEFAULT_BATCH_SIZES, model_meta=None, envelope=DEFAULT_ENVELOPE):
    """The largest logit difference from the reference under each protocol setting of ``envelope``, on ``images``.

    Returns {"per_setting": {name: jitter}, "per_entry": {envelope entry: largest}, "max": largest,
    "logit_scale": largest |logit|, "envelope": the resolved entries}. Used by trigger generation (on its
    starting images: delta is calibrated on the largest jitter of the whole envelope) and by the benign
    matrix (on the deployed triggers).
    """
    reference = reference_logits(model, images)
    per_setting, per_entry = {}, {}
    for name, kind, entry, thunk in benign_settings(model, images, batch_sizes, model_meta, envelope=envelope):
        if kind == "protocol":
            per_setting[name] = max_abs_jitter(thunk(), reference)
            per_entry[entry] = max(per_entry.get(entry, 0.0), per_setting[name])
    return {"per_setting": per_setting, "per_entry": per_entry, "max": max(per_setting.values(), default=0.0),
            "logit_scale": reference.abs().max().item() if len(reference) else 0.0,
            "envelope": list(resolve_envelope(envelope))}


def calibrate_delta(jitter, safety_factor, eps=torch.finfo(torch.float32).eps):
    """delta = safety factor x max(measured jitter, a few ulps of the largest logit), ulps of the arithmetic whose
    machine epsilon is ``eps`` (fp32's unless a deployment computes in half precision)."""
    if safety_factor < 1:
        raise UserError(f"the delta safety factor must be at least 1 (got {safety_factor})")
    ulp_floor = ULP_FLOOR_FACTOR * eps * max(1.0, jitter["logit_scale"])
    return safety_factor * max(jitter["max"], ulp_floor)
