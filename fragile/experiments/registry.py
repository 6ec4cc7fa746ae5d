"""Every ``eval.py --attack`` name: its function ``attack(ctx, params, seed) -> (run, tampered model or None)``
and its parameter dataclass, which eval.py fills from its header (None: the attack runs on what every attack
shares, ``ctx.finetune`` and ``ctx.poison``)."""
from collections import namedtuple

from ..attacks.compression import PruneParams, QuantizeParams, run_prune, run_quantize
from ..attacks.fine_prune import FinePruneParams, run_fine_prune
from ..attacks.finetune import run_finetune, run_poison
from ..attacks.obfuscate import ObfuscateParams, run_obfuscate
from ..attacks.restore import RestoreParams, run_restore
from ..attacks.weights import BitflipParams, NoiseParams, SingleWeightParams, run_bitflip, run_noise, run_single_weight
from .benign import BenignParams, run_benign
from .compare import CompareParams, run_comparison

Attack = namedtuple("Attack", "run params")

ATTACKS = {"finetune": Attack(run_finetune, None), "poison": Attack(run_poison, None),
           "fine-prune": Attack(run_fine_prune, FinePruneParams), "obfuscate": Attack(run_obfuscate, ObfuscateParams),
           "noise": Attack(run_noise, NoiseParams), "single-weight": Attack(run_single_weight, SingleWeightParams),
           "bitflip": Attack(run_bitflip, BitflipParams), "prune": Attack(run_prune, PruneParams),
           "quantize": Attack(run_quantize, QuantizeParams), "restore": Attack(run_restore, RestoreParams),
           "benign": Attack(run_benign, BenignParams), "compare": Attack(run_comparison, CompareParams)}
DATA_PARALLEL = ("finetune", "poison")   # the attacks that run under torchrun
