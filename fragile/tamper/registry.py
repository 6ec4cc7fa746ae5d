"""Every ``eval.py --attack`` name: the attacks of the tamper suite, then the experiments built on them.

An entry is ``run(ctx, params, seed) -> (run record, tampered model or None)`` and its parameter class (None:
the attack runs on what every trajectory attack shares, ``ctx.finetune`` and ``ctx.poison``). eval.py builds
each parameter object from its header constants by name. Adding an attack: one file in fragile/tamper/ (its
parameters with their defaults, its perturbation, its run) and one line here (docs/architecture.md shows it).
"""
from collections import namedtuple

from ..core.cli import UserError
from . import (benign, compare, compression, fine_prune, finetune, layers, limit, obfuscate, one_sample, perturbation,
               restore, shift)
from . import degrade, distill
from . import clean_label, targeted, trojan

Attack = namedtuple("Attack", "run params")

ATTACKS = {
    "finetune": Attack(finetune.run_finetune, None),
    "poison": Attack(finetune.run_poison, None),
    "fine-prune": Attack(fine_prune.run_fine_prune, fine_prune.FinePruneParams),
    "obfuscate": Attack(obfuscate.run_obfuscate, obfuscate.ObfuscateParams),
    "noise": Attack(perturbation.run_noise, perturbation.NoiseParams),
    "single-weight": Attack(perturbation.run_single_weight, perturbation.SingleWeightParams),
    "bitflip": Attack(perturbation.run_bitflip, perturbation.BitflipParams),
    "prune": Attack(compression.run_prune, compression.PruneParams),
    "quantize": Attack(compression.run_quantize, compression.QuantizeParams),
    "restore": Attack(restore.run_restore, restore.RestoreParams),
    **{variant: Attack(layers.runner(variant), layers.LayerTuneParams) for variant in layers.VARIANTS},
    "unlearn": Attack(one_sample.run_unlearn, one_sample.UnlearnParams),
    "online": Attack(one_sample.run_online, one_sample.OnlineParams),
    "shift": Attack(shift.run_shift, shift.ShiftParams),
    "distill": Attack(distill.run_distill, distill.DistillParams),
    "random-class": Attack(degrade.run_random_class, degrade.DegradeParams),
    "specific-class": Attack(degrade.run_specific_class, degrade.DegradeParams),
    "random-sample": Attack(degrade.run_random_sample, degrade.DegradeParams),
    "clean-label": Attack(clean_label.run_clean_label, clean_label.CleanLabelParams),
    "trojan": Attack(trojan.run_trojan, trojan.TrojanParams),
    "targeted": Attack(targeted.run_targeted, targeted.TargetedParams),
}
EXPERIMENTS = {   # they tamper with nothing themselves: they run attacks, or none, and measure
    "benign": Attack(benign.run_benign, benign.BenignParams),
    "compare": Attack(compare.run_comparison, compare.CompareParams),
    "limit": Attack(limit.run_limit, limit.LimitParams),
}
RUNNABLE = {**ATTACKS, **EXPERIMENTS}
DATA_PARALLEL = ("finetune", "poison")   # the attacks that run under torchrun


def lookup(name):
    """The attack or experiment called ``name``; an unknown name lists the valid ones."""
    if name not in RUNNABLE:
        raise UserError(f"unknown attack {name!r}: choose one of {', '.join(RUNNABLE)}")
    return RUNNABLE[name]
