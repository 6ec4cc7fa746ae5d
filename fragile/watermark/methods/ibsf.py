"""IBSF triggers: Intersecting-Boundary-Sensitive Fingerprinting (Bai, He, Ma, Zhu, Jin; ICML 2024).

Each trigger maximises the Shannon entropy of the model's k largest softmax probabilities, ``-sum p log p``
over the top k (not renormalised), so that it sits where k decision boundaries intersect; the larger k, the
more sensitive. Read from the public code (CGCL-codes/IBSF, main.py ``sensitive_sample_gen`` and utils.py
``similarity_projection``):

faithful  the loss (top-k of the full softmax, k = 2 by default, 2 <= k <= classes); plain SGD on the pixels
          with lr 1.0; 5000 iterations; after each step the image is projected into the L2 ball of radius
          eps = 1.0 (pixels in [0, 1]) around its natural start, then clipped to [0, 1]; the lowest-loss
          iterate is kept.
differs   (1) the 8-bit grid: the forward pass sees the rounded image (straight-through), kept inside the
          ball (grid_in_ball), so the exported PNG is the optimised image and within eps of its start; the
          code optimises and saves floats. (2) the key: IBSF starts from random training images of any class
          and has no label term; here each starts from a random correctly classified test image of its key
          class (as ftg's key-class option does) and only iterates that keep the key label by at least the
          benign jitter (label floor) are kept. A trigger with no such iterate is an error, never a shorter set.
          (3) a batch of images per step: SGD and the entropy are per image, so this equals the code's
          one-at-a-time loop. (4) the code stores the image after the step whose loss it compared (one step
          late); here the image kept is the one whose loss was measured.
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ...core.cli import UserError
from ...core.data import to_float
from .common import BestIterates, grid_in_ball, label_floor, natural_starts, on_key, project_l2_, psnr_summary, \
    require_all


@dataclass(frozen=True)
class IBSFParams:
    """The defaults are the IBSF code's (main.py)."""
    k: int = 2                # top-k softmax classes whose entropy is maximised
    steps: int = 5000         # SGD iterations
    lr: float = 1.0           # SGD learning rate, pixels in [0, 1]
    eps: float = 1.0          # L2 radius around the natural start, pixels in [0, 1]
    control_seed: int = 0     # which test images it starts from
    envelope: list = field(default_factory=lambda: ["exact"])   # whose jitter sets the label floor


def topk_entropy(logits, k):
    """Per image: Shannon entropy of its k largest softmax probabilities (taken from the full softmax)."""
    top = F.softmax(logits, dim=1).topk(k, dim=1).values
    return -(top * top.clamp_min(1e-30).log()).sum(1)


def generate(job, p):
    """SGD on the top-k entropy from natural images of the key class, in the L2 ball, on the 8-bit grid."""
    model, device = job.model, job.device
    if not 2 <= p.k <= job.spec.num_classes:
        raise UserError(f"--ibsf-k must be between 2 and the number of classes ({job.spec.num_classes}), got {p.k}")
    starts = natural_starts(model, job.test, job.key, job.spec.num_classes, device, least_confident=False,
                            seed=p.control_seed)
    jitter, floor = label_floor(model, starts, p.envelope, device)
    key = torch.tensor(job.key, device=device)
    start = to_float(starts.to(device))
    x = start.clone().requires_grad_(True)
    optimiser = torch.optim.SGD([x], lr=p.lr)
    best = BestIterates(starts.to(device))
    model.eval().requires_grad_(False)
    for step in range(p.steps + 1):
        image = grid_in_ball(x, start, p.eps)
        logits = model(image)
        entropy = topk_entropy(logits, p.k)
        best.offer(image, -entropy, on_key(logits, key, floor))
        if step == p.steps:
            break
        optimiser.zero_grad()
        (-entropy.sum()).backward()
        optimiser.step()
        with torch.no_grad():
            project_l2_(x, start, p.eps)
        if step % 500 == 0:
            job.log(f"ibsf step {step}: mean top-{p.k} entropy {entropy.mean().item():.4f}")
    require_all(best.found, f"kept their key label by the benign jitter ({floor:.2e})",
                "try another --control-seed or a narrower --envelope")
    return best.images.cpu(), {"start_images": starts,
                               "meta": {"start": "random correctly classified test images of the key class",
                                        "benign_jitter": jitter, "label_floor": floor,
                                        "topk_entropy_mean": (-best.loss).mean().item(),
                                        "psnr_to_start": psnr_summary(best.images, starts)}}
