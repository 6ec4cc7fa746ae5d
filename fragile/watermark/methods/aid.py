"""AID triggers: "edge points" (Aramoon, Chen, Qu; DAC 2021).

An edge point starts from random noise and is driven to where every class logit equals the largest one, while
the neurons of the network are kept active, so that one query checks as many parameters as possible. Read from
the public code (oaramoon/AID-DAC21, create_edge_points.py):

faithful  the loss ``sum over classes c of (max logit - logit_c)^2`` (keras MSE of two scalars) ``+ 0.2 x sum
          over the conv layers (and hidden dense layers) of mean ReLU(-their output)``, the outputs taken
          before batch norm as the code's conv layers are; a uniform-noise start in [0, 1]; plain gradient
          descent ``x -= lr x grad`` then clipping to [0, 1]; 15000 iterations, lr 1e-4, halved after a third
          and quartered after two thirds of them (the code's 5000 and 10000); the lowest-loss iterate is kept.
differs   (1) the 8-bit grid: the forward pass sees the rounded image (straight-through), so the exported
          PNG is the optimised image; the code keeps floats. (2) the key: an edge point has no class (all
          logits meet), so, as the ``random`` control does, the key becomes the model's own label of each
          exported trigger (``job.key`` is rewritten in place); that label must lead the runner-up by at
          least the benign jitter (the label floor), else the export would be a coin toss, so the best
          iterate is the lowest-loss one above the floor. A trigger with none is an error, never a shorter
          set. (3) a batch of noise images per step: the loss and the step are per image, as in the
          code's one-image loop.
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..trigger_io import quantize, straight_through_quantize
from .common import BestIterates, label_floor, labels_of, on_key, require_all

ACTIVE_WEIGHT = 0.2   # the code's lambda_hyperparameter


@dataclass(frozen=True)
class AIDParams:
    """The defaults are the AID code's (create_edge_points.py)."""
    steps: int = 15000        # gradient-descent iterations
    lr: float = 1e-4          # their step size, pixels in [0, 1]; halved after 1/3, quartered after 2/3
    control_seed: int = 0     # which noise images it starts from
    envelope: list = field(default_factory=lambda: ["exact"])   # whose jitter sets the label floor


def logit_spread(logits):
    """Per image: sum over classes of (max logit - logit_c)^2, zero where every class meets."""
    return (logits.max(1, keepdim=True).values - logits).pow(2).sum(1)


def edge_loss(model, images):
    """(per-image AID loss, logits): the logit spread plus 0.2 x the mean inactivity of every conv layer and
    every hidden linear layer, read by forward hooks."""
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))][:-1]   # not the output
    inactive = []
    handles = [m.register_forward_hook(lambda module, args, out: inactive.append(F.relu(-out).flatten(1).mean(1)))
               for m in layers]
    try:
        logits = model(images)
    finally:
        for handle in handles:
            handle.remove()
    return logit_spread(logits) + ACTIVE_WEIGHT * torch.stack(inactive).sum(0), logits


def step_size(p, step):
    """The code's schedule: lr, then lr/2 after a third of the steps, lr/4 after two thirds."""
    return p.lr / (1 if step < p.steps / 3 else 2 if step < 2 * p.steps / 3 else 4)


def generate(job, p):
    """Edge points from uniform noise; the key becomes the model's labels of the exported triggers."""
    model, device = job.model, job.device
    gen = torch.Generator().manual_seed(p.control_seed)
    x = torch.rand((len(job.key), *job.spec.shape), generator=gen).to(device).requires_grad_(True)
    starts = quantize(x).cpu()
    jitter, floor = label_floor(model, starts, p.envelope, device)
    best = BestIterates(starts.to(device))
    model.eval().requires_grad_(False)
    for step in range(p.steps + 1):
        image = straight_through_quantize(x)
        loss, logits = edge_loss(model, image)
        best.offer(image, loss, on_key(logits, logits.argmax(1), floor))   # its own label, above the floor
        if step == p.steps:
            break
        grad, = torch.autograd.grad(loss.sum(), x)
        with torch.no_grad():
            x.sub_(step_size(p, step) * grad).clamp_(0, 1)
        if step % 1000 == 0:
            job.log(f"aid step {step}: mean loss {loss.mean().item():.4e}")
    require_all(best.found, f"kept a label above the benign jitter ({floor:.2e})",
                "try another --control-seed or a narrower --envelope")
    triggers = best.images.cpu()
    job.key[:] = labels_of(model, triggers, device).tolist()   # the caller saves the list it passed in
    return triggers, {"start_images": starts,
                      "meta": {"start": "uniform noise", "key_source": "the model's labels of the edge points",
                               "benign_jitter": jitter, "label_floor": floor,
                               "loss_mean": best.loss.mean().item()}}
