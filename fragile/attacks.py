"""Tampering a model the way an attacker (or a careless deployer) would, while tracking the watermark.

Each attack takes an ``EvalContext`` and a seed and returns a run: ``{"seed", "records": [...], ...}``.
A record is one measurement point: at least ``flipped``, ``match_rate`` and ``detected``, plus the
attack's own coordinates (``step``/``epoch`` for trajectories, ``sigma``, ``k``, ... for sweeps).
"""
import copy
from dataclasses import dataclass, field

import torch

from .data import Split, to_float
from . import distributed as dist
from .devices import seed_everything
from .progress import progress_bar
from .training import accuracy, grad_scaler, make_sgd, predict_logits, sgd_kernels, train_mode, train_steps
from .verification import queries_until_mismatch, query_labels

EARLY_STEPS_DEFAULT = (1, 2, 5, 10, 20, 50, 100)


@dataclass
class EvalContext:
    """Everything an attack needs: the untouched model (never modified), data, triggers, key, config."""
    model: torch.nn.Module
    spec: object
    train: Split
    test: Split
    triggers: torch.Tensor          # uint8, on the device
    key: torch.Tensor               # int64, on the CPU
    config: dict
    device: torch.device
    log: callable = print
    extras: dict = field(default_factory=dict)   # e.g. the robust watermark's trigger set

    def fresh_copy(self):
        """A deep copy to tamper with: the watermarked model itself is never changed."""
        return copy.deepcopy(self.model)


# ----------------------------------------------------------------------------- measurements

def watermark_state(model, ctx, max_mismatches=0):
    """Flipped count, match rate, verdict; with the trigger set's recorded query order, also how many
    single queries a verifier asking the most fragile triggers first would need to see a mismatch."""
    labels = query_labels(model, ctx.triggers)
    flipped = int((labels != ctx.key).sum())
    state = {"flipped": flipped, "match_rate": 1 - flipped / len(ctx.key), "detected": flipped > max_mismatches}
    if ctx.extras.get("query_order"):
        state["queries_in_fragility_order"] = queries_until_mismatch(labels, ctx.key, ctx.extras["query_order"])
    return state


def stamp_patch(images, size, position, value):
    """BadNets trigger: a size x size square of ``value`` (0-255) stamped on float images in [0, 1]."""
    images = images.clone()
    h, w = images.shape[-2:]
    top = 0 if position.startswith("top") else h - size
    left = 0 if position.endswith("left") else w - size
    images[..., top:top + size, left:left + size] = value / 255.0
    return images


def attack_success_rate(model, ctx):
    """Patched test images of every other class that the model puts in the target class."""
    cfg = ctx.config
    keep = ctx.test.labels != cfg["POISON_TARGET"]
    patched = stamp_patch(to_float(ctx.test.images[keep]), cfg["PATCH_SIZE"], cfg["PATCH_POSITION"], cfg["PATCH_VALUE"])
    preds = predict_logits(model, patched, cfg["EVAL_BATCH_SIZE"]).argmax(1)
    return (preds == cfg["POISON_TARGET"]).float().mean().item()


def poison_transform(cfg, gen, rank=0, world_size=1):
    """Stamp the patch on a fraction of every batch (after augmentation, so the patch stays put) and
    relabel those samples to the target class: BadNets poisoning mixed into clean data. Data parallel,
    every rank draws for the whole global batch and keeps its slice, as the batches themselves are drawn."""
    def transform(images, labels):
        n = len(labels)
        drawn = torch.rand(n * world_size, device=labels.device, generator=gen)
        chosen = drawn[rank * n:(rank + 1) * n] < cfg["POISON_FRACTION"]
        patched = stamp_patch(images, cfg["PATCH_SIZE"], cfg["PATCH_POSITION"], cfg["PATCH_VALUE"])
        images = torch.where(chosen[:, None, None, None], patched, images)
        return images, torch.where(chosen, torch.full_like(labels, cfg["POISON_TARGET"]), labels)
    return transform


def measure(model, ctx, step, epoch, poisoned, extra_metrics=()):
    """One record of a trajectory: watermark state, clean accuracy, and ASR when poisoning."""
    record = {"step": step, "epoch": epoch, **watermark_state(model, ctx, ctx.config["MAX_MISMATCHES"]),
              "clean_accuracy": accuracy(model, ctx.test, ctx.config["EVAL_BATCH_SIZE"])}
    if poisoned:
        record["attack_success_rate"] = attack_success_rate(model, ctx)
    for name, fn in extra_metrics:
        record[name] = fn(model)
    return record


@torch.no_grad()
def add_weight_noise(model, sigma, gen):
    """Gaussian noise of standard deviation ``sigma`` on every parameter (drawn on the CPU: reproducible)."""
    for p in model.parameters():
        p.add_(sigma * torch.randn(p.shape, generator=gen).to(p.device))


# ----------------------------------------------------------------------------- fine-tuning

def fine_tune(model, ctx, seed, epochs, poisoned=False, extra_metrics=(), phase="finetune", step_offset=0,
              data=None):
    """SGD fine-tuning with the paper's settings, recording the watermark step by step.

    Records: before any step, after each of the early steps inside the first epoch, after every epoch.
    Verification runs after every step until the first detection, so its step is exact. Under torchrun
    the steps are data parallel (DDP) and every measurement runs on rank 0 while the others wait; the
    records and first detection are rank 0's (None on the other ranks).
    """
    cfg = ctx.config
    seed_everything(seed)
    data = data or ctx.train
    gen = torch.Generator(device=data.images.device)  # draws batches where the data lives
    gen.manual_seed(seed)
    poison_gen = torch.Generator(device=ctx.device)   # picks poisoned samples where the batch lives
    poison_gen.manual_seed(seed + 1)
    optimizer = make_sgd(model, cfg["LR"], cfg["MOMENTUM"], cfg["WEIGHT_DECAY"], kernels=sgd_kernels(cfg["FUSED_OPTIMIZER"]),
                         decay_all=cfg.get("DECAY_ALL", True))
    scaler = grad_scaler(ctx.device, cfg["AMP"])   # fp16 autocast only: its loss scale carries across epochs
    if cfg.get("CHANNELS_LAST") and ctx.device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    train_model = dist.wrap(model, ctx.device)   # DDP under torchrun; measurements use the plain module
    train_model = torch.compile(train_model) if cfg.get("COMPILE") else train_model
    transform = poison_transform(cfg, poison_gen, dist.rank(), dist.world_size()) if poisoned else None
    steps_per_epoch = -(-len(data) // cfg["BATCH_SIZE"])
    early = set(cfg["EARLY_STEPS"])

    def record_at(step, epoch):
        return dict(measure(model, ctx, step + step_offset, epoch, poisoned, extra_metrics), phase=phase)

    records = [dist.on_main(record_at, 0, 0.0)]
    first_detection = (0 if records[0]["detected"] else None) if dist.is_main() else None
    # Until the first detection every step is verified: the other ranks learn whether it came (and so
    # whether to wait for the next one) from rank 0.
    undetected = first_detection is None
    step = 0
    for epoch in range(epochs):
        steps = train_steps(train_model, optimizer, data, ctx.spec, gen, cfg["BATCH_SIZE"], ctx.device, cfg["AMP"],
                            augmented=cfg["AUGMENT"], batch_transform=transform, first_step=step,
                            freeze_bn=cfg.get("FREEZE_BN", False), scaler=scaler,
                            rank=dist.rank(), world_size=dist.world_size())
        bar_on = cfg.get("PROGRESS", False) and dist.is_main()
        for step, loss, _, _ in progress_bar(steps, total=steps_per_epoch, desc=f"{phase} epoch {epoch + 1}/{epochs}",
                                             enabled=bar_on):
            if dist.any_across(undetected, ctx.device) and dist.on_main(watermark_detected, model, ctx):
                first_detection = step + step_offset
            undetected = dist.is_main() and first_detection is None
            if epoch == 0 and step in early and step < steps_per_epoch:
                records.append(dist.on_main(record_at, step, step / steps_per_epoch))
            train_mode(model, cfg.get("FREEZE_BN", False))
        if dist.any_across(not torch.isfinite(loss), ctx.device):
            ctx.log(f"loss became {loss.item()} at epoch {epoch + 1}: stopping this run")
            break
        record = dist.on_main(record_at, step, float(epoch + 1))
        records.append(record)
        if dist.is_main():
            ctx.log(f"  {phase} epoch {epoch + 1}/{epochs}: match rate {record['match_rate']:.2f} "
                    f"({record['flipped']} flipped), clean acc {record['clean_accuracy']:.4f}"
                    + (f", ASR {record['attack_success_rate']:.3f}" if poisoned else ""))
    return (records if dist.is_main() else []), first_detection


def watermark_detected(model, ctx):
    return watermark_state(model, ctx, ctx.config["MAX_MISMATCHES"])["detected"]


def run_finetune(ctx, seed, poisoned=False):
    model = ctx.fresh_copy()
    records, first = fine_tune(model, ctx, seed, ctx.config["EPOCHS"], poisoned, ctx.extras.get("metrics", ()))
    return {"seed": seed, "records": records, "first_detection_step": first}, model


def run_poison(ctx, seed):
    return run_finetune(ctx, seed, poisoned=True)


ATTACKS = {"finetune": run_finetune, "poison": run_poison}
