"""What every attack works on, and how it measures the watermark.

An attack takes an ``EvalContext``, its own parameters and a seed and returns a run:
``{"seed", "records": [...], ...}``. A record is one measurement point: at least ``flipped``,
``match_rate`` and ``detected``, plus the attack's own coordinates (``step``/``epoch`` for
trajectories, ``setting`` with ``sigma``, ``k``, ... for sweeps).
"""
import copy
import dataclasses
import math
from dataclasses import dataclass, field

import torch

from ..core.cli import UserError, flag_of
from ..core.data import Split
from ..core.training import accuracy
from ..watermark import robust
from ..watermark.verify import expected_queries, queries_to_detection, query_labels


@dataclass(frozen=True)
class FinetuneParams:
    """SGD fine-tuning, the paper's attack; eval.py's header holds the paper's settings."""
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    decay_all: bool          # decay every parameter, batch norm included (the paper's plain SGD)
    augment: bool
    freeze_bn: bool          # batch-norm statistics frozen: only the weights move
    amp: bool                # mixed precision for the steps on a GPU (verification stays fp32)
    fused_optimizer: bool
    channels_last: bool      # on a GPU only
    compile: bool
    early_steps: list        # extra measurements inside the first epoch


@dataclass(frozen=True)
class PoisonParams:
    """BadNets: a square patch stamped on a fraction of every batch, relabelled to the target class."""
    HEADER_PREFIX = "POISON_"
    fraction: float
    target: int
    patch_size: int = field(metadata={"header": "PATCH_SIZE"})
    patch_position: str = field(metadata={"header": "PATCH_POSITION"})   # bottom-right | bottom-left | top-...
    patch_value: int = field(metadata={"header": "PATCH_VALUE"})         # 0-255


@dataclass
class EvalContext:
    """Everything an attack needs: the untouched model (never modified), data, triggers, key, and the settings
    shared by every attack (fine-tuning, BadNets, verification tolerance)."""
    model: torch.nn.Module
    spec: object
    train: Split
    test: Split
    triggers: torch.Tensor          # uint8, on the device
    key: torch.Tensor               # int64, on the CPU
    device: torch.device
    finetune: FinetuneParams
    poison: PoisonParams
    max_mismatches: int = 0         # verification tolerance, as in verify.py
    eval_batch_size: int = 1024
    query_order: list = None        # most fragile trigger first, as recorded at generation
    trigger_meta: dict = field(default_factory=dict)
    tensor_file: str = None         # the triggers.pt beside the PNGs, if any
    model_meta: dict = None         # the checkpoint's metadata (for the save/load round trip)
    backdoor: dict = None           # the robust watermark's trigger set, when the checkpoint carries one
    progress: bool = False
    log: callable = print

    def fresh_copy(self):
        """A deep copy to tamper with: the watermarked model itself is never changed."""
        return copy.deepcopy(self.model)

    @property
    def extra_metrics(self):
        """(name, model -> value) measured beside the fragile watermark: the robust one, when present."""
        if self.backdoor is None:
            return []
        return [("backdoor_accuracy", lambda m: robust.trigger_accuracy(m, self.backdoor))]

    def with_finetune(self, **changes):
        return dataclasses.replace(self, finetune=dataclasses.replace(self.finetune, **changes))


# ----------------------------------------------------------------------------- measurements

def watermark_state(model, ctx):
    """Flipped count, match rate, verdict; with the trigger set's recorded query order, also how many
    single queries a verifier asking the most fragile triggers first would need to see a mismatch."""
    flipped_mask = query_labels(model, ctx.triggers) != ctx.key
    flipped = int(flipped_mask.sum())
    state = {"flipped": flipped, "match_rate": 1 - flipped / len(ctx.key), "detected": flipped > ctx.max_mismatches}
    if ctx.query_order:
        state["queries_in_fragility_order"] = queries_to_detection(flipped_mask, ctx.query_order)
    return state


def state_record(model, ctx, **coords):
    """The record of one deterministic tampering: watermark state, clean accuracy, expected queries."""
    state = watermark_state(model, ctx)
    return {**coords, **state, "clean_accuracy": accuracy(model, ctx.test, ctx.eval_batch_size),
            "mean_queries_to_detection": expected_queries(state["flipped"], len(ctx.key), ctx.max_mismatches)}


def log_point(ctx, record):
    probability = record.get("detection_probability", float(record["detected"]))
    accuracy_text = "n/a" if record["clean_accuracy"] is None else f"{record['clean_accuracy']:.4f}"
    ctx.log(f"  {record['setting']}: {record.get('mean_flipped', record['flipped']):.2f} flipped, "
            f"detection {probability:.2f}, clean acc {accuracy_text}")


def scientific(value):
    """1e-04 style, with more digits only where they are needed (2.5e-04)."""
    short = f"{value:.0e}"
    return short if float(short) == value else f"{value:.3g}"


# ----------------------------------------------------------------------------- parameter checks

def positive_int(params, name):
    """``params.name``, refused (naming its flag) unless it is a positive integer."""
    value = getattr(params, name)
    if not isinstance(value, int) or value < 1:
        raise UserError(f"{flag_of(type(params), name)} must be a positive integer, got {value!r}")
    return value


def sweep(params, name, low=0.0, high=math.inf):
    """``params.name``: a non-empty list of numbers in [low, high], named by its flag in the error."""
    values, flag = getattr(params, name), flag_of(type(params), name)
    if not values:
        raise UserError(f"{flag} needs at least one value")
    bad = [v for v in values if not low <= v <= high]
    if bad:
        raise UserError(f"{flag} values must lie in [{low:g}, {high:g}], got {bad[0]!r}")
    return values


def choices(params, name, allowed):
    """``params.name``: a non-empty list whose every entry is one of ``allowed``."""
    values = getattr(params, name)
    unknown = [v for v in values if v not in allowed]
    if unknown or not values:
        raise UserError(f"{flag_of(type(params), name)}: choose from {', '.join(allowed)} (got {unknown or 'none'})")
    return values
