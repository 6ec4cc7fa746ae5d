"""Owner-side tampered copies of the model: what ``margin`` triggers are built to fail on.

Fine-tuning a trained model on data of its own distribution moves every input's logits in a highly
repeatable direction (docs/sensitivity.md measures how repeatable). A trigger that sits a hair above its
boundary on the deployed model but on the other side of it on the owner's own fine-tuned copies is
therefore very likely to flip under an attacker's fine-tuning too -- while nothing about the deployed
model changes.

The copies are fine-tuned with seeds and a data sample of their own (``SURROGATE_SEED``), never the
ones the evaluation's attacks use, so the comparison scores the triggers on tampering they never saw.
"""
import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...core.cli import UserError
from ...core.data import balanced_subset, train_batches
from ...core.devices import seed_everything
from ...core.training import make_sgd, predict_logits, sgd_kernels, train_steps
from .common import key_margins

SURROGATE_SEED = 424_242   # far from the small seeds eval.py's attacks use


@dataclass(frozen=True)
class SurrogateParams:
    count: int = 2           # copies fine-tuned (0: none)
    steps: int = 80          # SGD steps each (one epoch of 20k images at batch 256)
    subset: int = 20000      # class-balanced training images they fine-tune on (0: all)
    lr: float = 1e-3         # their recipe: the paper's fine-tuning...
    momentum: float = 0.9
    weight_decay: float = 1e-3
    batch_size: int = 256
    mix_bn: bool = True      # every second copy fine-tunes with batch-norm statistics frozen
    gap: float = 0.3         # on each copy, another class must beat the key by this many logits


def fine_tuned_surrogates(model, train, spec, p, device, log=print):
    """``p.count`` copies of ``model``, each fine-tuned for ``p.steps`` SGD steps (lr, momentum, weight decay,
    batch size from ``p``) on a class-balanced sample of ``train`` (``p.subset`` images; 0: all of it).
    With ``p.mix_bn`` every second copy keeps its batch-norm statistics frozen: an attacker may fine-tune
    either way, and the two move logits in different directions (the drift of the running statistics
    dominates the first kind). Returned in eval mode, gradients off."""
    if p.count <= 0:
        return []
    if train is None or len(train) == 0:
        raise UserError("margin triggers with surrogates need the training split (--data-dir), or pass --margin-surrogates 0")
    data = balanced_subset(train, p.subset, spec.num_classes, seed=SURROGATE_SEED).to(device)
    copies = []
    for i in range(p.count):
        seed = SURROGATE_SEED + 1 + i
        surrogate = copy.deepcopy(model).requires_grad_(True)
        seed_everything(seed)
        gen = torch.Generator(device=data.images.device).manual_seed(seed)
        optimizer = make_sgd(surrogate, p.lr, p.momentum, p.weight_decay,
                             kernels=sgd_kernels(device.type == "cuda"),
                             decay_all=False)  # the recipe they were measured with
        freeze_bn = p.mix_bn and i % 2 == 1
        step = 0
        while step < p.steps:  # whole epochs until the step budget is spent
            batches = train_batches(data, p.batch_size, spec, gen)
            for step, _, _, _ in train_steps(surrogate, optimizer, batches, first_step=step, freeze_bn=freeze_bn):
                if step >= p.steps:
                    break
        copies.append(surrogate.eval().requires_grad_(False))
        log(f"surrogate {i + 1}/{p.count}: {step} fine-tuning steps (seed {seed}"
            f"{', batch-norm statistics frozen' if freeze_bn else ''})")
    return copies


@torch.no_grad()
def surrogate_flip_fraction(surrogates, images, key, batch_size=4096):
    """Per image: the fraction of surrogates whose label is not the key (0 when there are none)."""
    flips = torch.zeros(len(images))
    for surrogate in surrogates:
        flips += (predict_logits(surrogate, images, batch_size).argmax(1).cpu() != key.cpu()).float()
    return flips / max(1, len(surrogates))


def surrogate_hinge(surrogates, images, key, gap):
    """Per trigger, summed over the surrogates: how far the key still is from losing by ``gap`` logits there
    (``margin``'s continuous phase minimises it, with gradients through ``images``)."""
    loss = torch.zeros(len(images), device=images.device)
    for surrogate in surrogates:
        loss = loss + F.relu(key_margins(surrogate(images), key).min(1).values + gap)
    return loss
