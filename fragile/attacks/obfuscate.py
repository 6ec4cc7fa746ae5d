"""NNSplitter-style obfuscation (Zhou et al., ICML 2023): a handful of weights pushed to raise the clean loss,
each staying within its layer's range of values."""
from dataclasses import dataclass

import torch

from ..core.data import train_batches
from ..core.weights import count_changed, matrix_weights
from .context import log_point, positive_int, state_record, sweep
from .perturb import obfuscate


@dataclass(frozen=True)
class ObfuscateParams:
    HEADER_PREFIX = "OBFUSCATE_"
    ks: list                 # weights obfuscated, one record each
    steps: int               # signed-gradient ascent steps on the clean loss
    batch_size: int          # clean training images per ascent step
    step_size: float         # per step, as a fraction of the weight's layer's largest |w|


def cycling_batches(train, batch_size, spec, seed):
    """Clean, unaugmented training batches, reshuffled each pass, forever. The shuffle is drawn where the
    data lives (the CPU under --no-data-on-device), as train_batches requires."""
    gen = torch.Generator(device=train.images.device)
    gen.manual_seed(seed)
    while True:
        yield from train_batches(train, batch_size, spec, gen, augmented=False)


def run_obfuscate(ctx, p, seed):
    """Obfuscation of k weights for every k in ``p.ks``, each from the untouched model."""
    positive_int(p, "steps")
    positive_int(p, "batch_size")
    total = sum(w.numel() for w in matrix_weights(ctx.model))
    records, model = [], None
    for k in sweep(p, "ks", 1, total):
        model = ctx.fresh_copy()
        batches = cycling_batches(ctx.train, p.batch_size, ctx.spec, seed)
        loss_before, loss_after = obfuscate(model, int(k), batches, p.steps, p.step_size)
        records.append(state_record(model, ctx, setting=f"k={k}", k=int(k),
                                    weights_changed=count_changed(model, ctx.model), weights_fraction=k / total,
                                    loss_before=loss_before, loss_after=loss_after))
        log_point(ctx, records[-1])
    return {"seed": seed, "records": records, "obfuscatable_weights": total}, model
