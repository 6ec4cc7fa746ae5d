"""Fine-tuning, clean or BadNets-poisoned, the paper's attack, with the watermark recorded step by step.

    eval.py --attack finetune    FinetuneParams (fragile.tamper.context): the paper's SGD settings
    eval.py --attack poison      the same, with PoisonParams' BadNets patch on a fraction of every batch

Records (fragile.tamper.records.step_record): before any step, after each of the early steps inside the first
epoch, after every epoch. Verification runs after every step until the first detection, so its step is exact.
"""
import torch

from ..core import distributed as dist
from ..core.cli import progress_bar
from ..core.data import to_float, train_batches
from ..core.devices import seed_everything
from ..core.training import grad_scaler, make_sgd, predict_logits, sgd_kernels, train_mode, train_steps
from . import records
from .context import note_change


def stamp_patch(images, size, position, value):
    """BadNets trigger: a size x size square of ``value`` (0-255) stamped on float images in [0, 1]."""
    images = images.clone()
    h, w = images.shape[-2:]
    top = 0 if position.startswith("top") else h - size
    left = 0 if position.endswith("left") else w - size
    images[..., top:top + size, left:left + size] = value / 255.0
    return images


def attack_success_rate(model, ctx, patch=None):
    """Patched test images of every other class that the model puts in the target class (``patch``: any object
    with PoisonParams' target and patch fields; default ``ctx.poison``)."""
    p, test = patch or ctx.poison, ctx.probe.test
    keep = test.labels != p.target
    patched = stamp_patch(to_float(test.images[keep]), p.patch_size, p.patch_position, p.patch_value)
    preds = predict_logits(model, patched, ctx.probe.eval_batch_size).argmax(1)
    return (preds == p.target).float().mean().item()


def poison_transform(p, gen, rank=0, world_size=1):
    """Stamp the patch on a fraction of every batch (after augmentation, so the patch stays put) and
    relabel those samples to the target class: BadNets poisoning mixed into clean data. Data parallel,
    every rank draws for the whole global batch and keeps its slice, as the batches themselves are drawn."""
    def transform(images, labels):
        n = len(labels)
        drawn = torch.rand(n * world_size, device=labels.device, generator=gen)
        chosen = drawn[rank * n:(rank + 1) * n] < p.fraction
        patched = stamp_patch(images, p.patch_size, p.patch_position, p.patch_value)
        images = torch.where(chosen[:, None, None, None], patched, images)
        return images, torch.where(chosen, torch.full_like(labels, p.target), labels)
    return transform


def measure(model, ctx, phase, poisoned, extra_metrics, step, epoch):
    """One record of a trajectory: watermark state, clean accuracy, ASR when poisoning, and ``extra_metrics``
    (model -> {name: value}: the robust watermark's accuracy, a defended backdoor's success rate)."""
    state, clean_accuracy = ctx.probe.state(model), ctx.probe.clean_accuracy(model)
    metrics = {"attack_success_rate": attack_success_rate(model, ctx)} if poisoned else {}
    metrics.update(extra_metrics(model))
    return records.step_record(step, epoch, phase, state, clean_accuracy, **metrics)


# ----------------------------------------------------------------------------- fine-tuning

def no_metrics(model):
    return {}


def fine_tune(model, ctx, seed, epochs, poisoned=False, extra_metrics=no_metrics, phase="finetune", step_offset=0,
              data=None, make_optimizer=None, lr_for_step=None, stop_when=None):
    """SGD fine-tuning of ``model`` in place with ``ctx.finetune``'s settings, recording the watermark step by
    step (``extra_metrics``: model -> {name: value}, measured at every record too); returns (records, first
    detection step). Parameters with ``requires_grad`` off stay as they are; ``make_optimizer`` (model ->
    optimizer) replaces the SGD; ``lr_for_step`` (step counted from 0 -> learning rate) schedules it;
    ``stop_when`` (model, step -> bool, asked after every step) ends the run early, with a last record at that
    step. Under torchrun the steps are data parallel (DDP) and every measurement runs on rank 0 while the others
    wait; the records and first detection are rank 0's (None on the other ranks)."""
    cfg = ctx.finetune
    seed_everything(seed)
    data = data or ctx.train
    gen = torch.Generator(device=data.images.device)  # draws batches where the data lives
    gen.manual_seed(seed)
    poison_gen = torch.Generator(device=ctx.device)   # picks poisoned samples where the batch lives
    poison_gen.manual_seed(seed + 1)
    optimizer = make_optimizer(model) if make_optimizer else \
        make_sgd(model, cfg.lr, cfg.momentum, cfg.weight_decay, kernels=sgd_kernels(cfg.fused_optimizer),
                 decay_all=cfg.decay_all)
    scaler = grad_scaler(ctx.device, cfg.amp)   # fp16 autocast only: its loss scale carries across epochs
    if cfg.channels_last and ctx.device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    train_model = dist.wrap(model, ctx.device)   # DDP under torchrun; measurements use the plain module
    train_model = torch.compile(train_model) if cfg.compile else train_model
    transform = poison_transform(ctx.poison, poison_gen, dist.rank(), dist.world_size()) if poisoned else None
    steps_per_epoch = -(-len(data) // cfg.batch_size)
    early = set(cfg.early_steps)
    measured = (model, ctx, phase, poisoned, extra_metrics)   # what every measurement of this run shares

    trajectory = [dist.on_main(measure, *measured, step_offset, 0.0)]
    first_detection = (0 if trajectory[0]["detected"] else None) if dist.is_main() else None
    # Until the first detection every step is verified: the other ranks learn whether it came (and so
    # whether to wait for the next one) from rank 0.
    undetected = first_detection is None
    step, stopped, early_record = 0, False, False
    for epoch in range(epochs):
        batches = train_batches(data, cfg.batch_size, ctx.spec, gen, cfg.augment, rank=dist.rank(),
                                world_size=dist.world_size())
        steps = train_steps(train_model, optimizer, batches, cfg.amp, scaler, batch_transform=transform,
                            first_step=step, freeze_bn=cfg.freeze_bn, lr_for_step=lr_for_step)
        bar_on = ctx.progress and dist.is_main()
        for step, loss, _, _ in progress_bar(steps, total=steps_per_epoch, desc=f"{phase} epoch {epoch + 1}/{epochs}",
                                             enabled=bar_on):
            if dist.any_across(undetected, ctx.device) and dist.on_main(ctx.probe.detected, model):
                first_detection = step + step_offset
            undetected = dist.is_main() and first_detection is None
            early_record = epoch == 0 and step in early and step < steps_per_epoch
            if early_record:
                trajectory.append(dist.on_main(measure, *measured, step + step_offset, step / steps_per_epoch))
            stopped = stop_when is not None and dist.any_across(dist.on_main(stop_when, model, step), ctx.device)
            train_mode(model, cfg.freeze_bn)
            if stopped:
                break
        if dist.any_across(not torch.isfinite(loss), ctx.device):
            ctx.log(f"loss became {loss.item()} at epoch {epoch + 1}: stopping this run")
            break
        if stopped and early_record:
            break   # the step it stopped at is recorded already
        at_epoch = step / steps_per_epoch if stopped else float(epoch + 1)
        record = dist.on_main(measure, *measured, step + step_offset, at_epoch)
        trajectory.append(record)
        if dist.is_main():
            ctx.log(f"  {phase} epoch {at_epoch:g}/{epochs}: match rate {record['match_rate']:.2f} "
                    f"({record['flipped']} flipped), clean acc {record['clean_accuracy']:.4f}"
                    + (f", ASR {record['attack_success_rate']:.3f}" if poisoned else ""))
        if stopped:
            break
    return (trajectory if dist.is_main() else []), first_detection


def fine_tune_run(ctx, model, seed, epochs, phase, what, extra_metrics=no_metrics, **options):
    """The run record of fine-tuning ``model``, a copy the caller prepared (``options`` go to fine_tune): its
    trajectory, first detection, and whether anything changed at all (``what`` names the run if nothing did);
    ``extra_metrics`` are measured at every record beside the probe's own."""
    def metrics(m):
        return {**extra_metrics(m), **ctx.probe.extra_metrics(m)}
    trajectory, first = fine_tune(model, ctx, seed, epochs, extra_metrics=metrics, phase=phase, **options)
    changed = note_change(ctx, model, what)
    return records.run_record(seed, trajectory, first_detection_step=first, model_changed=changed), model


def run_finetune(ctx, params, seed, poisoned=False):
    """eval.py --attack finetune: ``ctx.finetune`` is its whole setting (``params`` is None)."""
    model = ctx.fresh_copy()
    trajectory, first = fine_tune(model, ctx, seed, ctx.finetune.epochs, poisoned, ctx.probe.extra_metrics)
    return records.run_record(seed, trajectory, first_detection_step=first), model


def run_poison(ctx, params, seed):
    """eval.py --attack poison: fine-tuning with ``ctx.poison``'s BadNets batches mixed in."""
    return run_finetune(ctx, params, seed, poisoned=True)
