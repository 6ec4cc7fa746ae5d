"""Compression a deployer might apply: global magnitude pruning, and fp16 / bf16 / int8 weight round trips.

    eval.py --attack prune       PruneParams: fractions of the conv/linear weights zeroed, smallest |w| first
    eval.py --attack quantize    QuantizeParams: storage round trips, int8 weight-only per channel / per tensor

Deterministic: one record per setting, each from the untouched model.
"""
from dataclasses import dataclass, field

import torch

from ..core.weights import count_changed, flatten, matrix_weights, write_flat
from . import records
from .context import log_point


@dataclass(frozen=True)
class PruneParams:
    ratios: list = field(default_factory=lambda: [0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9])


@dataclass(frozen=True)
class QuantizeParams:
    modes: list = field(default_factory=lambda: ["fp16", "bf16", "int8", "int8-tensor"])   # of QUANTIZERS


# ----------------------------------------------------------------------------- the compressions

def magnitude_prune(params, ratio):
    """Global magnitude pruning: zero the ``ratio`` fraction of entries with the smallest |w|. Returns the count."""
    flat = flatten(params)
    n = int(round(ratio * flat.numel()))
    if n:
        flat[torch.topk(flat.abs(), n, largest=False).indices] = 0
        write_flat(params, flat)
    return n


@torch.no_grad()
def precision_round_trip(model, dtype):
    """Store every float tensor (weights and BatchNorm statistics) in ``dtype`` and read it back as float32."""
    for tensor in model.state_dict().values():
        if tensor.is_floating_point():
            tensor.copy_(tensor.to(dtype).to(tensor.dtype))


@torch.no_grad()
def int8_weight_only(model, per_channel=True):
    """Symmetric absmax int8 quantization of convolution and linear weights, dequantized back (weight-only
    int8 inference computes with exactly these values); per output channel, or one scale per tensor."""
    for p in matrix_weights(model):
        rows = p.reshape(len(p), -1)
        absmax = rows.abs().amax(dim=1, keepdim=True) if per_channel else rows.abs().max().expand(len(p), 1)
        scale = (absmax / 127).clamp_min(torch.finfo(torch.float32).tiny)
        p.copy_((rows / scale).round().clamp(-127, 127).mul(scale).view_as(p))


QUANTIZERS = {"fp16": lambda m: precision_round_trip(m, torch.float16),
              "bf16": lambda m: precision_round_trip(m, torch.bfloat16),
              "int8": lambda m: int8_weight_only(m, per_channel=True),
              "int8-tensor": lambda m: int8_weight_only(m, per_channel=False)}


# ----------------------------------------------------------------------------- the attacks

def run_prune(ctx, p, seed):
    """Global magnitude pruning of convolution and linear weights, one point per ratio."""
    points, model = [], None
    for ratio in p.ratios:
        model = ctx.fresh_copy()
        zeroed = magnitude_prune(matrix_weights(model), ratio)
        points.append(ctx.probe.point(model, f"ratio={ratio:g}", ratio=ratio, weights_zeroed=zeroed,
                                      weights_changed=count_changed(model, ctx.model)))
        log_point(ctx, points[-1])
    return records.run_record(seed, points), model


def run_quantize(ctx, p, seed):
    """fp16 and bf16 storage round trips; int8 weight-only quantization per output channel and per tensor."""
    points, model = [], None
    for mode in p.modes:
        model = ctx.fresh_copy()
        QUANTIZERS[mode](model)
        points.append(ctx.probe.point(model, mode, mode=mode, weights_changed=count_changed(model, ctx.model)))
        log_point(ctx, points[-1])
    return records.run_record(seed, points), model
