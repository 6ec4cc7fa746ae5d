"""FTG-style triggers (the same group's follow-up, J. Inf. Intell. 2024), on the 8-bit grid.

Signed-gradient pixel steps that minimise the softmax variance, from natural images of the key class,
landing where all classes meet. FTG itself has no label term and keeps float triggers; here each
trigger keeps its lowest-variance 8-bit iterate that still carries its key label by at least the
measured benign jitter (without that floor the export itself would be a coin toss).
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ...core.data import to_float
from ..trigger_io import straight_through_quantize
from .common import BestIterates, label_floor, natural_starts, on_key, psnr_summary


@dataclass(frozen=True)
class FTGParams:
    steps: int = 1000                # signed-gradient steps (FTG takes thousands)
    step_size: float = 0.25 / 255    # per step, in [0, 1] pixel units
    control_seed: int = 0            # which test images it starts from
    envelope: list = field(default_factory=lambda: ["exact"])   # whose jitter sets the label floor


def softmax_variance(logits):
    """Per-image variance of the softmax: 0 when every class is equally likely."""
    return F.softmax(logits, dim=1).var(dim=1)


def generate(job, p):
    """Minimise the softmax variance of each 8-bit trigger (straight-through rounding) from a random correctly
    classified test image of its key class; keep the best iterate above the label floor."""
    model, key, device = job.model, job.key, job.device
    starts = natural_starts(model, job.test, key, job.spec.num_classes, device, least_confident=False,
                            seed=p.control_seed)
    jitter, floor = label_floor(model, starts, p.envelope, device)   # just enough margin to export
    key_t = torch.tensor(key, device=device)
    x = to_float(starts.to(device)).requires_grad_(True)
    best = BestIterates(starts.to(device))   # a trigger with no valid iterate stays its (on-key) start
    model.eval().requires_grad_(False)
    for step in range(p.steps + 1):
        image = straight_through_quantize(x)
        logits = model(image)
        variance = softmax_variance(logits)
        best.offer(image, variance, on_key(logits, key_t, floor))   # the forward pass saw exactly the 8-bit images
        if step == p.steps:
            break
        grad, = torch.autograd.grad(variance.sum(), x)
        with torch.no_grad():
            x.sub_(p.step_size * grad.sign()).clamp_(0, 1)
        if step % 250 == 0:
            job.log(f"ftg step {step}: mean softmax variance {variance.mean().item():.3e}")
    return best.images.cpu(), {"start_images": starts,
                               "meta": {"start": "random correctly classified test images of the key class",
                                        "benign_jitter": jitter, "label_floor": floor,
                                        "psnr_to_start": psnr_summary(best.images, starts)}}
