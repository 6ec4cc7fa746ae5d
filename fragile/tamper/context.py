"""What every attack works on, and how it measures the watermark.

An attack is ``run(ctx, params, seed) -> (run record, tampered model or None)`` (fragile.tamper.registry):
``ctx`` an ``EvalContext``, ``params`` its own parameter object (built by eval.py from its header), ``seed``
the run's seed. Its records are built by fragile.tamper.records. The context is three parts: the untouched
model and the data (``model``, ``spec``, ``train``, ``device``), the ``probe`` that measures the watermark on
any copy, and the ``deployment`` the benign matrix and the comparison read (the trigger set's metadata and
files). Shared settings: ``finetune`` and ``poison``, the fine-tuning every trajectory attack runs.
"""
import copy
import dataclasses
from dataclasses import dataclass, field

import torch

from ..core.data import Split
from ..core.training import accuracy
from ..core.weights import state_changed
from ..deploy.targets import predictor
from ..watermark import robust
from ..watermark.queries import queries_to_detection, query_labels
from . import records


@dataclass(frozen=True)
class FinetuneParams:
    """SGD fine-tuning, the paper's attack (eval.py's header holds the paper's settings, which are these)."""
    epochs: int = 40
    batch_size: int = 256
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-3
    decay_all: bool = True        # decay every parameter, batch norm included (the paper's plain SGD)
    augment: bool = True
    freeze_bn: bool = False       # batch-norm statistics frozen: only the weights move
    amp: bool = True              # mixed precision for the steps on a GPU (verification stays fp32)
    fused_optimizer: bool = True
    channels_last: bool = True    # on a GPU only
    compile: bool = False
    early_steps: list = field(default_factory=lambda: [1, 2, 5, 10, 20, 50, 100])   # measured inside epoch 1


@dataclass(frozen=True)
class PoisonParams:
    """BadNets: a square patch stamped on a fraction of every batch, relabelled to the target class."""
    fraction: float = 0.1
    target: int = 0
    patch_size: int = 3
    patch_position: str = "bottom-right"   # bottom-right | bottom-left | top-right | top-left
    patch_value: int = 255                 # 0-255


# ----------------------------------------------------------------------------- measuring the watermark

@dataclass
class Probe:
    """The watermark as a verifier sees it, measured on any copy of the model: the triggers (uint8, on the
    device), the key (int64, on the CPU), the tolerance, the recorded query order (most fragile first), the
    clean test split, the robust watermark's trigger set when the checkpoint carries one, and the named
    ``deployment`` whose arithmetic labels the triggers (fragile.deploy.targets; empty: torch fp32)."""
    triggers: torch.Tensor
    key: torch.Tensor
    test: Split
    max_mismatches: int = 0
    eval_batch_size: int = 1024
    query_order: list = None
    backdoor: dict = None
    deployment: str = ""
    model_meta: dict = None

    @property
    def num_triggers(self):
        return len(self.key)

    def flipped_mask(self, model):
        if self.deployment:   # the copy as that deployment computes it (an ONNX one: exported afresh)
            logits = predictor(self.deployment, model, self.model_meta)(self.triggers.cpu())
            return logits.argmax(1) != self.key
        return query_labels(model, self.triggers) != self.key

    def state(self, model):
        """The verdict keys of ``model`` (fragile.tamper.records.verdict); with the recorded query order, also
        how many single queries a verifier asking the most fragile triggers first needs to see a mismatch."""
        mask = self.flipped_mask(model)
        state = records.verdict(int(mask.sum()), self.num_triggers, self.max_mismatches)
        if self.query_order:
            state["queries_in_fragility_order"] = queries_to_detection(mask, self.query_order)
        return state

    def detected(self, model):
        return int(self.flipped_mask(model).sum()) > self.max_mismatches

    def clean_accuracy(self, model):
        return accuracy(model, self.test, self.eval_batch_size)

    def extra_metrics(self, model):
        """What is measured beside the fragile watermark: the robust one's accuracy, when present."""
        return {} if self.backdoor is None else {"backdoor_accuracy": robust.trigger_accuracy(model, self.backdoor)}

    def point(self, model, setting, **coords):
        """The record of one deterministic tampering (fragile.tamper.records.point_record)."""
        return records.point_record(setting, self.state(model), self.clean_accuracy(model), **coords)


@dataclass
class Deployment:
    """What the trigger set's files say, for the experiments that check deployment itself: the trigger
    metadata, the triggers.pt beside the PNGs (if any), the checkpoint's metadata."""
    trigger_meta: dict = field(default_factory=dict)
    tensor_file: str = None
    model_meta: dict = None


@dataclass
class EvalContext:
    """The untouched model (never modified: attacks tamper with ``fresh_copy()``), its data, the probe, the
    shared fine-tuning settings, and where log lines go."""
    model: torch.nn.Module
    spec: object
    train: Split
    device: torch.device
    probe: Probe
    finetune: FinetuneParams = field(default_factory=FinetuneParams)
    poison: PoisonParams = field(default_factory=PoisonParams)
    deployment: Deployment = field(default_factory=Deployment)
    progress: bool = False
    log: callable = print

    def fresh_copy(self):
        """A deep copy to tamper with: the watermarked model itself is never changed."""
        return copy.deepcopy(self.model)

    def with_finetune(self, **changes):
        return dataclasses.replace(self, finetune=dataclasses.replace(self.finetune, **changes))


def note_change(ctx, model, what):
    """Whether ``model`` differs at all from the untouched one (weights and buffers, recomputed). A tampering that
    changed nothing is said so, and its run records it (``model_changed``): no change, never a missed detection."""
    changed = state_changed(model, ctx.model)
    if not changed:
        ctx.log(f"  {what} left the model unchanged: recorded as no change, not as a miss")
    return changed


def log_point(ctx, record):
    accuracy_text = "n/a" if record["clean_accuracy"] is None else f"{record['clean_accuracy']:.4f}"
    ctx.log(f"  {record['setting']}: {record['mean_flipped']:.2f} flipped, "
            f"detection {record['detection_probability']:.2f}, clean acc {accuracy_text}")


def scientific(value):
    """1e-04 style, with more digits only where they are needed (2.5e-04)."""
    short = f"{value:.0e}"
    return short if float(short) == value else f"{value:.3g}"
