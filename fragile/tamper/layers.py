"""BIVBench's fine-tuning family: which layers train, and whether the last one starts again.

    eval.py --attack ftal    fine-tune all layers
    eval.py --attack ftll    fine-tune the last layer only (every other parameter frozen)
    eval.py --attack fzll    freeze the last layer, fine-tune all the others
    eval.py --attack rtal    re-initialise the last layer, then train all layers
    eval.py --attack rtll    re-initialise the last layer, then train it alone

The names are Adi et al.'s (USENIX Security 2018), as BIVBench (ACM MM 2024, CGCL-codes/BIVBench) runs them: its
``wrt/attacks/removal/fine_tuning.py`` takes the model's last child module with parameters as "the last layer"
(here: the classifier's final ``nn.Linear``, which is that module in every architecture of models/), freezes
by ``requires_grad`` and re-initialises with the layer's own ``reset_parameters()``; its CIFAR-10 configs run
FTAL and FTLL for 1 epoch, FZLL for 5, RTAL and RTLL for 20, on batches of 64, RTAL and RTLL with Adam lr 1e-3.
The defaults of ``LayerTuneParams`` are those numbers. Two differences, both stated in the results' settings:
FTAL / FTLL / FZLL continue with the suite's fine-tuning SGD (``ctx.finetune``: the paper's lr 1e-3, momentum
0.9) where BIVBench continues the classifier's own training optimizer; RTAL / RTLL keep Adam's rate constant
where BIVBench divides it by 5 at epochs 5, 10 and 15. Batch-norm statistics update in every layer while
training (BIVBench trains in train mode too), so even FTLL moves the frozen layers' running statistics.

Every run records whether the weights changed at all (``model_changed``, recomputed from the weights): 0 epochs
of FTAL, FTLL or FZLL leave the model as it was, which is "no change", never a missed detection.
"""
from dataclasses import dataclass

import torch

from ..core.devices import seed_everything
from .fine_prune import classifier_layer
from .finetune import fine_tune_run


@dataclass(frozen=True)
class LayerTuneParams:
    ftal_epochs: int = 1        # BIVBench's CIFAR-10 configs, epoch for epoch
    ftll_epochs: int = 1
    fzll_epochs: int = 5
    rtal_epochs: int = 20
    rtll_epochs: int = 20
    batch_size: int = 64        # every variant
    retrain_lr: float = 1e-3    # rtal, rtll: Adam, as BIVBench retrains a re-initialised layer


# What each variant trains and whether it starts the last layer again: (train the last layer, train the others,
# re-initialise the last layer).
VARIANTS = {"ftal": (True, True, False), "ftll": (True, False, False), "fzll": (False, True, False),
            "rtal": (True, True, True), "rtll": (True, False, True)}


def prepare(model, variant, seed):
    """Freeze and re-initialise ``model`` in place as ``variant`` does (the re-initialisation drawn from ``seed``)."""
    train_last, train_others, reinit = VARIANTS[variant]
    head = classifier_layer(model)
    model.requires_grad_(train_others)
    head.requires_grad_(train_last)
    if reinit:
        seed_everything(seed)
        head.reset_parameters()


def run_variant(variant, ctx, p, seed):
    """Prepare a copy as ``variant`` does, fine-tune it (recording the watermark step by step), and record whether
    its weights changed at all."""
    epochs = getattr(p, f"{variant}_epochs")
    model = ctx.fresh_copy()
    prepare(model, variant, seed)
    reinit = VARIANTS[variant][2]
    adam = (lambda m: torch.optim.Adam([w for w in m.parameters() if w.requires_grad], lr=p.retrain_lr)) \
        if reinit else None
    return fine_tune_run(ctx.with_finetune(batch_size=p.batch_size), model, seed, epochs, variant,
                         f"{variant} with {epochs} epochs", make_optimizer=adam)


def runner(variant):
    """``run(ctx, params, seed)`` of one variant, for the registry."""
    def run(ctx, p, seed):
        return run_variant(variant, ctx, p, seed)
    run.__name__ = f"run_{variant}"
    return run
