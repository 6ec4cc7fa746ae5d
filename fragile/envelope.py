"""The deployment envelope: which benign changes of a deployment an owner accepts.

``generate_samples.py --envelope`` names them; delta (the smallest margin a ``margin`` trigger keeps) is
calibrated on the largest logit jitter measured across all of them (fragile/benign.py), and the benign
matrix (``eval.py --attack benign``) covers each and reports its false alarms. ``exact`` is the fp32
matrix this suite always ran; fp16 and bf16 are half-precision inference of the same weights, whose logits
move by orders of magnitude more.
"""
import copy

import torch

from .cli import UserError

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
