"""What the trigger methods share: the job they work on, margins over the key, natural starting images and
PSNR to them, the label floor, the L2 ball on the 8-bit grid, and the best-iterate bookkeeping of the
methods that optimise from a start (ftg, ibsf, ssf, aid)."""
import math
from dataclasses import dataclass

import torch

from ...core.cli import UserError
from ...core.data import Split
from ...core.training import predict_logits
from ..jitter import calibrate_delta, measure_jitter
from ..queries import top2_margins


@dataclass
class TriggerJob:
    """What every trigger method works on. ``key`` is the list of labels the triggers must carry (a control
    may rewrite it in place); ``test`` feeds the methods that start from natural images, ``train`` the
    surrogates of ``margin``."""
    model: torch.nn.Module          # frozen, in eval mode; never changed
    spec: object
    key: list
    device: torch.device
    test: Split = None
    train: Split = None
    progress: bool = False
    log: callable = print
    deployments: tuple = ()         # named deployments (fragile.deploy.arithmetic) margin triggers are calibrated in


def key_margins(logits, key):
    """(N, K) margins of the key logit over every class; +inf in the key's own column."""
    key_logit = logits.gather(1, key[:, None])
    margins = key_logit - logits
    return margins.scatter(1, key[:, None], math.inf)


def psnr(a_uint8, b_uint8):
    """Per-image PSNR in dB of two uint8 batches (inf where identical)."""
    mse = (a_uint8.double() - b_uint8.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(255.0 ** 2 / mse)


def psnr_summary(triggers, starts):
    values = psnr(triggers.cpu(), starts.cpu())
    finite = values[torch.isfinite(values)]
    return {"mean_db": finite.mean().item() if len(finite) else None,
            "min_db": finite.min().item() if len(finite) else None,
            "identical": int((~torch.isfinite(values)).sum())}


def labels_of(model, images, device):
    return predict_logits(model, images.to(device), max(1, len(images))).argmax(1).cpu()


def correctly_classified_by_class(model, test, num_classes, device):
    """For every class: indices of correctly classified test images, least confident (smallest margin) first."""
    if test is None or len(test) == 0:
        raise UserError("natural-image trigger sources need the test split (--data-dir)")
    logits = predict_logits(model, test.images.to(device), 1024).cpu()
    margin = top2_margins(logits)
    correct = logits.argmax(1) == test.labels.cpu()
    pools = []
    for k in range(num_classes):
        index = torch.nonzero(correct & (test.labels.cpu() == k)).flatten()
        pools.append(index[margin[index].argsort()])
    return pools


def natural_starts(model, test, key, num_classes, device, least_confident=True, seed=0):
    """One distinct correctly classified test image per key entry, of the key's class."""
    pools = correctly_classified_by_class(model, test, num_classes, device)
    gen = torch.Generator().manual_seed(seed)
    chosen, used = [], [0] * num_classes
    for k in key:
        pool = pools[k] if least_confident else pools[k][torch.randperm(len(pools[k]), generator=gen)]
        pools[k] = pool
        if used[k] >= len(pool):
            raise UserError(f"only {len(pool)} correctly classified test images of class {k}: "
                            f"ask for fewer triggers")
        chosen.append(pool[used[k]].item())
        used[k] += 1
    return test.images[torch.tensor(chosen)].cpu()



def label_floor(model, starts, envelope, device):
    """(jitter, floor): the benign logit jitter on ``starts`` across ``envelope`` and the smallest margin over the
    runner-up a trigger may keep (the jitter itself, safety factor 1): below it the exported label is a coin toss."""
    jitter = measure_jitter(model, starts.to(device), envelope=envelope)
    return jitter, calibrate_delta(jitter, 1.0)


def on_key(logits, key, floor):
    """Which images carry their ``key`` label by more than ``floor``."""
    return key_margins(logits, key).min(1).values > floor


def l2_distance(a, b):
    """Per-image L2 distance of two float batches, in float64 (8-bit differences add up exactly)."""
    return (a.double() - b.double()).flatten(1).norm(dim=1)


def project_l2_(x, start, radius):
    """In place: each image of ``x`` into the L2 ball of ``radius`` around its ``start``, then into [0, 1] (the
    order of SSF's and IBSF's projections)."""
    shrink = (radius / l2_distance(x, start).clamp_min(1e-12)).clamp(max=1.0).to(x.dtype)
    x.copy_((start + (x - start) * shrink.view(-1, *[1] * (x.dim() - 1))).clamp(0, 1))
    return x


def grid_in_ball(x, start, radius, shrink=0.9, tries=80):
    """Straight-through 8-bit image of ``x`` that stays in the L2 ball around ``start`` (itself on the grid).
    Rounding alone can leave the ball (up to half a grey level per pixel), so the displacement of an image whose
    rounded version would is scaled down by ``shrink`` until it fits; 0.9**80 rounds any displacement to zero."""
    with torch.no_grad():
        step = x - start
        scale = torch.ones(len(x), *[1] * (x.dim() - 1), device=x.device, dtype=x.dtype)
        for _ in range(tries):
            grid = (start + step * scale).clamp(0, 1).mul(255).round().div(255)
            outside = l2_distance(grid, start) > radius
            if not outside.any():
                break
            scale[outside] *= shrink
    return x + (grid - x).detach()


class BestIterates:
    """Per trigger, the lowest-loss 8-bit iterate seen that passed ``valid`` (SSF, IBSF and AID keep their best
    iterate, FTG its last: ftg passes minus the step as the loss; here only among those that carry their label)."""

    def __init__(self, like):
        self.images = like.clone()
        self.loss = torch.full((len(like),), math.inf, device=like.device)

    def offer(self, images, loss, valid):
        with torch.no_grad():
            better = valid & (loss.detach() < self.loss)
            self.images[better] = images.detach()[better].clamp(0, 1).mul(255).round().to(self.images.dtype)
            self.loss[better] = loss.detach()[better]

    @property
    def found(self):
        return torch.isfinite(self.loss)


def require_all(found, what, hint):
    """Refuse to ship fewer triggers than asked: one error line with the count and the flag that helps."""
    got, total = int(found.sum()), len(found)
    if got < total:
        raise UserError(f"{got} of {total} triggers {what}: {hint}")
