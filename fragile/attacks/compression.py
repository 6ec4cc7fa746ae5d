"""Compression a deployer might apply: global magnitude pruning, and fp16 / bf16 / int8 weight round trips.
Deterministic: one record per setting, each from the untouched model."""
from dataclasses import dataclass

from ..core.weights import count_changed, matrix_weights
from .context import choices, log_point, state_record, sweep
from .perturb import QUANTIZERS, magnitude_prune


@dataclass(frozen=True)
class PruneParams:
    HEADER_PREFIX = "PRUNE_"
    ratios: list             # fractions of the conv/linear weights zeroed, smallest |w| first


@dataclass(frozen=True)
class QuantizeParams:
    HEADER_PREFIX = "QUANTIZE_"
    modes: list              # of QUANTIZERS: storage round trips, int8 weight-only per channel / per tensor


def run_prune(ctx, p, seed):
    """Global magnitude pruning of convolution and linear weights, one point per ratio."""
    records, model = [], None
    for ratio in sweep(p, "ratios", 0.0, 1.0):
        model = ctx.fresh_copy()
        zeroed = magnitude_prune(matrix_weights(model), ratio)
        records.append(state_record(model, ctx, setting=f"ratio={ratio:g}", ratio=ratio, weights_zeroed=zeroed,
                                    weights_changed=count_changed(model, ctx.model)))
        log_point(ctx, records[-1])
    return {"seed": seed, "records": records}, model


def run_quantize(ctx, p, seed):
    """fp16 and bf16 storage round trips; int8 weight-only quantization per output channel and per tensor."""
    records, model = [], None
    for mode in choices(p, "modes", QUANTIZERS):
        model = ctx.fresh_copy()
        QUANTIZERS[mode](model)
        records.append(state_record(model, ctx, setting=mode, mode=mode,
                                    weights_changed=count_changed(model, ctx.model)))
        log_point(ctx, records[-1])
    return {"seed": seed, "records": records}, model
