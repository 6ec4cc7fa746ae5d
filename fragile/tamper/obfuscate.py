"""NNSplitter-style obfuscation (Zhou et al., ICML 2023): a handful of weights pushed to raise the clean loss,
each staying within its layer's range of values.

    eval.py --attack obfuscate   ObfuscateParams: k weights, signed-gradient ascent steps on the clean loss

The method comparison calls ``obfuscate`` too (one unbounded step, scaled by each tensor's spread).
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..core.cli import UserError
from ..core.data import train_batches
from ..core.weights import count_changed, flatten, matrix_weights, write_flat
from . import records
from .context import log_point


@dataclass(frozen=True)
class ObfuscateParams:
    ks: list = field(default_factory=lambda: [1, 10, 100, 275])   # weights obfuscated (NNSplitter: 275 of ResNet-18's 11M)
    steps: int = 40               # signed-gradient ascent steps on the clean loss
    batch_size: int = 128         # clean training images per ascent step
    step_size: float = 0.05       # per step, as a fraction of the weight's layer's largest |w|


# ----------------------------------------------------------------------------- the obfuscation

def loss_and_grad(model, params, batch):
    """Clean loss of the deployed (eval-mode) model and its gradient over ``params`` as one vector."""
    images, labels = batch
    model.eval()
    loss = F.cross_entropy(model(images), labels)
    grads = torch.autograd.grad(loss, params)
    return loss.item(), torch.cat([g.reshape(-1) for g in grads])


def obfuscate(model, k, batches, steps, step_size, scale="layer-max", bounded=True):
    """NNSplitter-style: pick the k convolution/linear weights with the largest clean-loss gradient on the first
    of ``batches`` and push only those, by ``steps`` of signed-gradient ascent (a fresh batch each), to raise
    the clean loss. A step is ``step_size`` times the weight's layer's largest |w| (``scale="layer-max"``) or
    its tensor's standard deviation (``"std"``). ``bounded``: each stays within its layer's range of values, as
    NNSplitter keeps them, so a range check cannot spot them. Returns the clean loss before and after, both on
    the batch that chose the weights."""
    model.requires_grad_(True)
    params = matrix_weights(model)
    original = flatten(params)
    bound = torch.cat([p.detach().abs().max().expand(p.numel()) for p in params])
    unit = bound if scale == "layer-max" else torch.cat([p.detach().std().expand(p.numel()) for p in params])
    batches = iter(batches)
    first_batch = next(batches)
    loss_before, grad = loss_and_grad(model, params, first_batch)
    chosen = torch.topk(grad.abs(), k).indices
    limit = bound[chosen] if bounded else torch.full((k,), torch.inf, device=original.device)
    step = step_size * unit[chosen]
    values = original[chosen].clone()
    for _ in range(steps):
        values = torch.maximum(torch.minimum(values + step * grad[chosen].sign(), limit), -limit)
        write_flat(params, original.index_put((chosen,), values))
        _, grad = loss_and_grad(model, params, next(batches))
    # A weight the ascent left exactly where it started (pinned at its layer's bound, or stepped out and
    # back) moves one step toward zero: obfuscation changes exactly k weights, and stays in range.
    stuck = values == original[chosen]
    toward_zero = torch.where(values == 0, torch.ones_like(values), -values.sign())
    values[stuck] += step[stuck] * toward_zero[stuck]
    write_flat(params, original.index_put((chosen,), values))
    loss_after, _ = loss_and_grad(model, params, first_batch)
    return loss_before, loss_after


# ----------------------------------------------------------------------------- the attack

def cycling_batches(train, batch_size, spec, seed):
    """Clean, unaugmented training batches, reshuffled each pass, forever. The shuffle is drawn where the
    data lives (the CPU under --no-data-on-device), as train_batches requires."""
    gen = torch.Generator(device=train.images.device)
    gen.manual_seed(seed)
    while True:
        yield from train_batches(train, batch_size, spec, gen, augmented=False)


def run_obfuscate(ctx, p, seed):
    """Obfuscation of k weights for every k in ``p.ks``, each from the untouched model."""
    total = sum(w.numel() for w in matrix_weights(ctx.model))
    points, model = [], None
    for k in p.ks:
        if k > total:
            raise UserError(f"cannot obfuscate {k} weights: the model has {total} convolution/linear weights")
        model = ctx.fresh_copy()
        batches = cycling_batches(ctx.train, p.batch_size, ctx.spec, seed)
        loss_before, loss_after = obfuscate(model, int(k), batches, p.steps, p.step_size)
        points.append(ctx.probe.point(model, f"k={k}", k=int(k), weights_changed=count_changed(model, ctx.model),
                                      weights_fraction=k / total, loss_before=loss_before, loss_after=loss_after))
        log_point(ctx, points[-1])
    return records.run_record(seed, points, obfuscatable_weights=total), model
