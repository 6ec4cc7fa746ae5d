"""The training and evaluation loops shared by train.py (from scratch) and eval.py (fine-tuning attacks), the
training recipes, and the random state a resumed run restores."""
import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import to_float
from .distributed import fail_if_asked


def amp_dtype(device, amp):
    """The autocast dtype for ``amp``: False -> None (fp32); True -> bf16 where the GPU runs it natively,
    fp16 (with a GradScaler) on older GPUs, fp32 on the CPU; "bf16" / "fp16" force that dtype on any device
    (the CPU tests exercise the GPU's mixed-precision code path this way)."""
    if amp in ("bf16", "fp16"):
        return torch.bfloat16 if amp == "bf16" else torch.float16
    if not amp or device.type != "cuda":
        return None
    # Emulated bf16 (pre-Ampere GPUs) is slower than fp32: there fp16 with loss scaling is the fast path.
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def autocast(device, amp):
    """Mixed precision as ``amp_dtype`` decides; plain fp32 (a null context) otherwise."""
    dtype = amp_dtype(device, amp)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(device, amp):
    """A GradScaler that is active only for fp16 autocast (bf16 and fp32 need no loss scaling)."""
    return torch.amp.GradScaler(device.type, enabled=amp_dtype(device, amp) == torch.float16)


def prepare_model(model, device, channels_last=False, compile_model=False):
    """The model on ``device``, in channels_last memory format when asked (scripts ask on GPUs only, where
    it is faster; tests ask on the CPU too, to run the same code), compiled when asked."""
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if compile_model else model


def optimizer_kernels(kernels, device_is_cuda):
    """torch.optim keyword for the update kernels: "auto" = fused on CUDA, foreach (multi-tensor) on the CPU;
    "fused" / "foreach" / "for-loop" force one (fused and foreach run on the CPU too, so tests cover them)."""
    if kernels == "auto":
        kernels = "fused" if device_is_cuda else "foreach"
    if kernels == "fused":
        return {"fused": True}
    return {"foreach": kernels == "foreach"}


def make_sgd(model, lr, momentum, weight_decay, nesterov=False, kernels="auto", decay_all=True):
    """SGD. ``decay_all`` decays every parameter, batch norm and biases included, as the paper's plain
    ``SGD(model.parameters(), weight_decay=...)`` does; off, norms and biases are not decayed (today's habit)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if decay_all or p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    device_is_cuda = next(model.parameters()).is_cuda
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0,
                           **optimizer_kernels(kernels, device_is_cuda))


def sgd_kernels(fused_flag):
    """A script's FUSED_OPTIMIZER switch as optimizer kernels: on = the fastest for the device, off = for-loop."""
    return "auto" if fused_flag else "for-loop"


def lr_at(step, total_steps, peak_lr, warmup_steps, schedule, steps_per_epoch=1):
    """Learning rate for ``step``: 'constant'; 'cosine', annealed once per epoch from the peak toward 0 with
    no warm-up (torch's CosineAnnealingLR stepped per epoch, T_max = the epochs: the paper's code); or
    'onecycle' (linear warm-up, then cosine decay to 0, per step)."""
    if schedule == "constant":
        return peak_lr
    if schedule == "cosine":
        epoch, epochs = step // steps_per_epoch, max(1, total_steps // steps_per_epoch)
        return peak_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, epoch / epochs)))
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


SCHEDULES = ("cosine", "onecycle", "constant")


@dataclass(frozen=True)
class TrainRecipe:
    """A training recipe: the settings train.py's header marks (recipe), by what they mean, not by a script's
    constant names (train.py maps them onto its own constants)."""
    batch_size: int
    lr: float                # peak learning rate, SGD
    schedule: str            # one of SCHEDULES
    warmup_epochs: float     # onecycle's warm-up
    momentum: float
    nesterov: bool
    weight_decay: float
    decay_all: bool          # weight decay on batch norm and biases too
    label_smoothing: float


def recipe_settings(recipe, device):
    """The recipe that replaces train.py's header settings, or None for ``paper``: the header holds the paper's own
    recipe (the paper's public code trains with it: plain cross-entropy, SGD lr 0.1, momentum 0.9, weight decay
    5e-4 on every parameter, batch 128, cosine annealing per epoch), so it changes nothing.
    fast: ours, a 95%-class CIFAR recipe: nesterov, one-cycle, label smoothing 0.1, no decay on norms and
    biases; batch 512 / lr 0.4 on CUDA (throughput), batch 64 / lr 0.1 on the CPU (enough steps per epoch).
    """
    if recipe == "paper":
        return None
    if recipe == "fast":
        on_gpu = device.type == "cuda"
        return TrainRecipe(batch_size=512 if on_gpu else 64, lr=0.4 if on_gpu else 0.1, schedule="onecycle",
                           warmup_epochs=1.0, momentum=0.9, nesterov=True, weight_decay=5e-4, decay_all=False,
                           label_smoothing=0.1)
    raise ValueError(f"unknown recipe {recipe!r}")


RECIPES = ("paper", "fast")


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


def train_steps(model, optimizer, batches, amp=False, scaler=None, *, lr_for_step=None, first_step=0,
                label_smoothing=0.0, batch_transform=None, freeze_bn=False):
    """One epoch of training over ``batches`` (``fragile.core.data.train_batches``, drawn lazily, one batch per
    step), yielding (step, loss tensor, correct count, batch size) after each step.

    Batches move to the model's device (a no-op when the data lives there). ``amp`` as ``autocast`` reads it;
    ``scaler`` (fp16 autocast) persists across epochs when the caller passes one, else each call makes its own.
    ``lr_for_step(step)`` sets the learning rate before each step, steps counted from ``first_step``;
    ``batch_transform(images, labels)`` lets attacks (poisoning) rewrite batches on the device; ``freeze_bn``
    as ``train_mode``. Losses stay on the device so the loop never waits for the GPU; callers synchronize only
    when they print. Under torchrun the caller DDP-wraps the model and draws this rank's share of each batch.
    """
    device = next(model.parameters()).device
    scaler = scaler or grad_scaler(device, amp)
    train_mode(model, freeze_bn)
    step = first_step
    for images, labels in batches:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)  # no-op on device
        if batch_transform is not None:
            images, labels = batch_transform(images, labels)
        if lr_for_step is not None:
            set_lr(optimizer, lr_for_step(step))
        with autocast(device, amp):
            logits = model(images)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()   # a pass-through unless fp16 autocast is on
        scaler.step(optimizer)
        scaler.update()
        step += 1
        fail_if_asked(step)
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


# ----------------------------------------------------------------------------- resuming

def capture_rng(gen):
    """The random state a resume file keeps: torch's, the data-order generator's (with its device), CUDA's."""
    return {"torch": torch.get_rng_state(), "device_gen": gen.get_state(), "device_gen_type": gen.device.type,
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng(state, gen, reseed):
    """The saved random state, where it fits. The data-order generator's state only fits a generator on the
    device it was saved from: resumed on another one (another machine, --no-data-on-device), the data order
    is reseeded instead, and the run says so."""
    torch.set_rng_state(state["torch"])
    saved_on = state.get("device_gen_type")
    if saved_on == gen.device.type:
        gen.set_state(state["device_gen"])
    else:
        gen.manual_seed(reseed)
        print(f"note: the data order was saved on {saved_on or 'another device'} and this run draws it on "
              f"{gen.device.type}: reseeded, so batches differ from an uninterrupted run")
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
