"""The training and evaluation loops shared by train.py (from scratch) and eval.py (fine-tuning attacks)."""
import contextlib
import math

import torch
import torch.nn.functional as F

from .data import to_float, train_batches


def autocast(device, enabled):
    """bf16 autocast on CUDA (a speed path); plain fp32 elsewhere or when disabled."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_model(model, device, channels_last=False, compile_model=False):
    model = model.to(device)
    if channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if compile_model else model


def make_sgd(model, lr, momentum, weight_decay, nesterov=False, fused=True):
    """SGD without weight decay on BN and biases; fused (GPU) or foreach kernels when asked."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    device_is_cuda = next(model.parameters()).is_cuda
    kwargs = {"fused": True} if (fused and device_is_cuda) else {"foreach": fused}
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0, **kwargs)


def lr_at(step, total_steps, peak_lr, warmup_steps, schedule):
    """Learning rate for ``step``: 'constant', or 'onecycle' (linear warm-up, cosine decay to 0)."""
    if schedule == "constant":
        return peak_lr
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_mode(model, freeze_bn=False):
    """Training mode; with ``freeze_bn`` the batch-norm layers stay in eval mode, so their running
    statistics do not move (a fine-tuning attacker's option: only the weights change)."""
    model.train()
    if freeze_bn:
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
    return model


def train_steps(model, optimizer, split, spec, gen, batch_size, device, amp=False, label_smoothing=0.0,
                augmented=True, batch_transform=None, lr_for_step=None, first_step=0, freeze_bn=False):
    """One epoch of training, yielding (step, loss tensor, correct count, batch size) after each step.

    ``batch_transform(images, labels)`` lets attacks (poisoning) rewrite batches on the device;
    ``lr_for_step(step)`` sets the learning rate before each step. Losses stay on the device so the
    loop never waits for the GPU; callers synchronize only when they print.
    """
    train_mode(model, freeze_bn)
    step = first_step
    for images, labels in train_batches(split, batch_size, spec, gen, augmented):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)  # no-op on device
        if batch_transform is not None:
            images, labels = batch_transform(images, labels)
        if lr_for_step is not None:
            set_lr(optimizer, lr_for_step(step))
        with autocast(device, amp):
            logits = model(images)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        yield step, loss.detach(), (logits.argmax(1) == labels).sum(), len(labels)


@torch.no_grad()
def predict_logits(model, images, batch_size=1024, amp=False):
    """Logits for float images in [0, 1] (or uint8 images), in large no-grad batches."""
    model.eval()
    device = next(model.parameters()).device
    outs = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].to(device)
        if batch.dtype == torch.uint8:
            batch = to_float(batch)
        with autocast(device, amp):
            outs.append(model(batch).float())
    return torch.cat(outs) if outs else torch.empty(0)


@torch.no_grad()
def accuracy(model, split, batch_size=1024, amp=False):
    preds = predict_logits(model, split.images, batch_size, amp).argmax(1).to(split.labels.device)
    return (preds == split.labels).float().mean().item()
