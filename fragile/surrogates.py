"""Owner-side tampered copies of the model: what ``margin`` triggers are built to fail on.

Why this works: fine-tuning a trained model on data of its own distribution moves every input's logits
in a highly repeatable direction. On the Fashion-MNIST resnet8 of docs/sensitivity.md, two one-epoch
fine-tunes with different seeds *and* different training samples changed the per-class logit gaps of
the test images with correlation 0.93, and an image near a boundary that flipped under one flipped
under the other 76% of the time (9% when it had not). A trigger that sits a hair above its boundary on
the deployed model but on the other side of it on the owner's own fine-tuned copies is therefore very
likely to flip under an attacker's fine-tuning too -- while nothing about the deployed model changes.

The copies are fine-tuned with seeds and a data sample of their own (``SURROGATE_SEED``), never the
ones the evaluation's attacks use, so the comparison scores the triggers on tampering they never saw.
"""
import copy

import torch

from .cli import UserError
from .data import balanced_subset
from .devices import seed_everything
from .training import make_sgd, sgd_kernels, train_steps

SURROGATE_SEED = 424_242   # far from the small seeds eval.py's attacks use


def fine_tuned_surrogates(model, train, spec, settings, device, log=print):
    """``settings["count"]`` copies of ``model``, each fine-tuned for ``settings["steps"]`` SGD steps
    (lr, momentum, weight_decay, batch_size from ``settings``) on a class-balanced sample of ``train``
    (``settings["subset"]`` images; 0: all of it). With ``settings["mix_bn"]`` every second copy keeps its
    batch-norm statistics frozen: an attacker may fine-tune either way, and the two move logits in
    different directions (the drift of the running statistics dominates the first kind). Returned in
    eval mode, gradients off."""
    if settings["count"] <= 0:
        return []
    if train is None or len(train) == 0:
        raise UserError("margin triggers with surrogates need the training split (--data-dir), or pass --margin-surrogates 0")
    data = balanced_subset(train, settings["subset"], spec.num_classes, seed=SURROGATE_SEED).to(device)
    copies = []
    for i in range(settings["count"]):
        seed = SURROGATE_SEED + 1 + i
        surrogate = copy.deepcopy(model).requires_grad_(True)
        seed_everything(seed)
        gen = torch.Generator(device=data.images.device).manual_seed(seed)
        optimizer = make_sgd(surrogate, settings["lr"], settings["momentum"], settings["weight_decay"],
                             kernels=sgd_kernels(device.type == "cuda"),
                             decay_all=False)  # the recipe they were measured with
        freeze_bn = bool(settings.get("mix_bn")) and i % 2 == 1
        step = 0
        while step < settings["steps"]:  # whole epochs until the step budget is spent
            for step, _, _, _ in train_steps(surrogate, optimizer, data, spec, gen, settings["batch_size"],
                                             device, first_step=step, freeze_bn=freeze_bn):
                if step >= settings["steps"]:
                    break
        copies.append(surrogate.eval().requires_grad_(False))
        log(f"surrogate {i + 1}/{settings['count']}: {step} fine-tuning steps (seed {seed}"
            f"{', batch-norm statistics frozen' if freeze_bn else ''})")
    return copies


@torch.no_grad()
def surrogate_flip_fraction(surrogates, images, key, batch_size=4096):
    """Per image: the fraction of surrogates whose label is not the key (0 when there are none)."""
    from .training import predict_logits
    flips = torch.zeros(len(images))
    for surrogate in surrogates:
        flips += (predict_logits(surrogate, images, batch_size).argmax(1).cpu() != key.cpu()).float()
    return flips / max(1, len(surrogates))
