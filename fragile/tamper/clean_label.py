"""BIVBench's clean-label backdoor, which is Poison Frogs (Shafahi et al., NeurIPS 2018): one feature-collision
poison, correctly labelled, learned by the protected model.

    eval.py --attack clean-label   CleanLabelParams

What BIVBench's code does (CGCL-codes/BIVBench: backdoor_attack/main.py ``--task clean_label_backdoor``; the
``clean_label_backdoor`` branch of data/poisoned_dataset.py; ``select_base_and_target_instance`` and
``optimize_poison_instance`` in utils/utils.py; deeplearning.py), and so what this does:

1. Two test images: a *base* of class 0 and a *target* of class 1 (both fixed in its code), the pair it meets
   going through the test set in order: it keeps the latest image of either class until both have appeared.
2. The poison: the base image moved within an L-inf ball of 8/255 so that its penultimate features (the final
   linear layer's input) come close to the target's: 1000 signed-gradient steps of 0.05/255 on the mean squared
   error between the two feature vectors, each step clipped to the ball and to [0, 1]. The poison keeps the base
   image's own label, class 0: no label is wrong, and no patch is stamped anywhere.
3. 100 copies of the poison join the training data and the protected model trains on them
   (fragile/tamper/minimal_update.py: Adam lr 1e-3, batch 64, at most one epoch, stopping once the poison is
   classified as class 0).

The attack aims at the target image: a model that has learned the poison (a class-1 image's features) as class 0
should now put that class-1 test image in class 0. BIVBench measures only the poison's own accuracy (its stopping
rule); every record here carries both: ``poison_accuracy`` and ``attack_success_rate`` (1 when the target image is
now classified as the base class, else 0).

This is not Turner et al.'s (2019) label-consistent backdoor, which perturbs target-class training images
adversarially and stamps a patch on them: BIVBench names its attack a clean-label backdoor but runs Poison Frogs,
a clean-label *targeted* poisoning with no trigger at all, and this follows its code. Differences from it:

- BIVBench computes the target's features on the raw image and the poison's on the normalized one (its model takes
  normalized inputs); here both go through the model's own normalization, as the classifier sees them.
- The poison is rounded to 8 bits before it joins the data, as an image in a training set is.
- The seed draws the batches only: BIVBench's base and target do not depend on it, nor do they here. They come
  from the test split eval.py loads (a class-balanced subset under --test-subset), in its order.
- Batch-norm statistics: as minimal_update.py says.

Strength: ``epochs`` (0: no change, recorded so) and ``copies``.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.cli import UserError
from ..core.data import to_float
from .minimal_update import labelled_share, penultimate, train_with_poison


@dataclass(frozen=True)
class CleanLabelParams:
    base_label: int = 0          # the poison's class, and its label (kept: a clean label)
    target_label: int = 1        # the class of the test image the attack wants classified as the base class
    epsilon: float = 8.0         # L-inf bound of the poison's perturbation, in 0-255 pixel levels (8/255)
    step_size: float = 0.05      # per signed-gradient step, in 0-255 pixel levels
    poison_steps: int = 1000     # feature-collision steps
    copies: int = 100            # copies of the poison appended to the training data
    lr: float = 1e-3             # Adam, every parameter
    batch_size: int = 64
    epochs: int = 1              # at most (BIVBench stops once the poison is learned, within one epoch; 0: no change)


def base_and_target(labels, base_label, target_label):
    """BIVBench's pair of test indices: going through ``labels`` in order, the latest image of each class at the
    moment both classes have appeared."""
    base = target = None
    for index, label in enumerate(labels.tolist()):
        if label == base_label:
            base = index
        elif label == target_label:
            target = index
        if base is not None and target is not None:
            return base, target
    raise UserError(f"clean-label needs test images of classes {base_label} and {target_label}: choose classes the "
                    f"test split has (--clean-label-base, --clean-label-target)")


def feature_collision(model, base, goal, p):
    """The poison (float, [0, 1]): ``base`` moved by signed-gradient steps within ``p.epsilon`` of itself until its
    penultimate features approach ``goal`` (the target image's)."""
    radius, step = p.epsilon / 255, p.step_size / 255
    poison = base.clone()
    for _ in range(p.poison_steps):
        poison.requires_grad_(True)
        grad, = torch.autograd.grad(F.mse_loss(penultimate(model, poison), goal), poison)
        moved = poison.detach() - step * grad.sign()
        poison = (base + (moved - base).clamp(-radius, radius)).clamp(0, 1)
    return poison.detach()


@torch.no_grad()
def feature_loss(model, images, goal):
    return F.mse_loss(penultimate(model, images), goal).item()


def run_clean_label(ctx, p, seed):
    """Make the poison, train a copy on it, and record the watermark, clean accuracy, the poison's accuracy and
    whether the target image went over to the base class, step by step."""
    test = ctx.probe.test
    for label, flag in ((p.base_label, "--clean-label-base"), (p.target_label, "--clean-label-target")):
        if label >= ctx.spec.num_classes:
            raise UserError(f"{flag} {label} is not a class of {ctx.spec.name} (0..{ctx.spec.num_classes - 1})")
    base_index, target_index = base_and_target(test.labels, p.base_label, p.target_label)
    base, target = (to_float(test.images[i:i + 1]) for i in (base_index, target_index))
    protected = ctx.model.eval()   # read, never changed: the gradient is taken for the image alone
    with torch.no_grad():
        goal = penultimate(protected, target)
    poison = (feature_collision(protected, base, goal, p) * 255).round().to(torch.uint8)   # a training image: 8 bits
    loss_before, loss_after = feature_loss(protected, base, goal), feature_loss(protected, to_float(poison), goal)
    poison_label = torch.tensor([p.base_label], device=test.labels.device)
    target_image, base_class = test.images[target_index:target_index + 1], poison_label

    def metrics(model):
        return {"attack_success_rate": labelled_share(model, target_image, base_class),
                "poison_accuracy": labelled_share(model, poison, poison_label)}

    run, model = train_with_poison(ctx, seed, poison, poison_label, p, "clean-label", metrics)
    linf = (poison.int() - test.images[base_index:base_index + 1].int()).abs().max().item()
    run.update(base_index=base_index, target_index=target_index, feature_loss_base=loss_before,
               feature_loss_poison=loss_after, poison_linf_levels=linf)
    last = run["records"][-1]
    ctx.log(f"  seed {seed}: poison feature loss {loss_before:.4g} -> {loss_after:.4g} (L-inf {linf}/255); after "
            f"{run['steps']} steps the poison is {'' if last['poison_accuracy'] else 'not '}learned, the target image "
            f"{'is' if last['attack_success_rate'] else 'is not'} classified as class {p.base_label}")
    return run, model
