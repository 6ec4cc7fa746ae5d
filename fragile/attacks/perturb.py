"""Every weight perturbation, once: the tamper suite's sweeps and the method comparison both call these.

Each acts on the weights as one flat vector (fragile.core.weights) or on a model in place. Random ones
take a CPU generator, so a seeded generator gives the same tampered model on any device and for every
trigger method. Gaussian noise on the weights is ``fragile.core.weights.add_gaussian_noise``: trigger
generation ranks triggers by it too, and it lives below both.
"""
import zlib

import torch
import torch.nn.functional as F

from ..core.cli import UserError
from ..core.weights import flatten, matrix_weights, write_flat

# float32 bit positions of each class: the low half of the mantissa barely moves a weight, the exponent
# can multiply it by 2^128.
BIT_CLASSES = {"mantissa-low": tuple(range(0, 12)), "mantissa-high": tuple(range(12, 23)),
               "exponent": tuple(range(23, 31)), "sign": (31,)}


def trial_generator(seed, *salt):
    """A CPU generator seeded by the run's seed and the trial's coordinates (the sweep point): trials
    reproduce and stay independent. (crc32, not hash(): Python salts string hashes per process.)"""
    return torch.Generator().manual_seed(zlib.crc32(repr((seed,) + salt).encode()))


# ----------------------------------------------------------------------------- single weights and bits

def nudge_one_weight(flat, gen, epsilon, relative=True, index=None, candidates=None):
    """Change one entry of the weight vector ``flat`` in place: times (1 +- epsilon), the sign drawn at random,
    when ``relative``; plus epsilon otherwise. The entry is ``index``, else drawn uniformly from the indices
    ``candidates`` (default: every entry). Returns its index."""
    if index is None:
        drawn = int(torch.randint(len(flat) if candidates is None else len(candidates), (1,), generator=gen))
        index = drawn if candidates is None else int(candidates[drawn])
    if relative:
        sign = 1 if torch.rand(1, generator=gen).item() < 0.5 else -1
        flat[index] *= 1 + sign * epsilon
    else:
        flat[index] += epsilon
    return index


def flip_bits(flat, positions, bits):
    """A copy of the float32 vector ``flat`` with bit ``bits[i]`` of entry ``positions[i]`` flipped."""
    if flat.dtype != torch.float32:
        raise UserError(f"bit flips are defined here for float32 weights, not {flat.dtype}")
    flipped = flat.clone()
    as_int = flipped.view(torch.int32)
    masks = torch.tensor([(1 << b) if b < 31 else -(1 << 31) for b in bits], dtype=torch.int32, device=flat.device)
    as_int[positions] = torch.bitwise_xor(as_int[positions], masks)
    return flipped


# ----------------------------------------------------------------------------- pruning and precision

def magnitude_prune(params, ratio):
    """Global magnitude pruning: zero the ``ratio`` fraction of entries with the smallest |w|. Returns the count."""
    flat = flatten(params)
    n = int(round(ratio * flat.numel()))
    if n:
        flat[torch.topk(flat.abs(), n, largest=False).indices] = 0
        write_flat(params, flat)
    return n


@torch.no_grad()
def precision_round_trip(model, dtype):
    """Store every float tensor (weights and BatchNorm statistics) in ``dtype`` and read it back as float32."""
    for tensor in model.state_dict().values():
        if tensor.is_floating_point():
            tensor.copy_(tensor.to(dtype).to(tensor.dtype))


@torch.no_grad()
def int8_weight_only(model, per_channel=True):
    """Symmetric absmax int8 quantization of convolution and linear weights, dequantized back (weight-only
    int8 inference computes with exactly these values); per output channel, or one scale per tensor."""
    for p in matrix_weights(model):
        rows = p.reshape(len(p), -1)
        absmax = rows.abs().amax(dim=1, keepdim=True) if per_channel else rows.abs().max().expand(len(p), 1)
        scale = (absmax / 127).clamp_min(torch.finfo(torch.float32).tiny)
        p.copy_((rows / scale).round().clamp(-127, 127).mul(scale).view_as(p))


QUANTIZERS = {"fp16": lambda m: precision_round_trip(m, torch.float16),
              "bf16": lambda m: precision_round_trip(m, torch.bfloat16),
              "int8": lambda m: int8_weight_only(m, per_channel=True),
              "int8-tensor": lambda m: int8_weight_only(m, per_channel=False)}


# ----------------------------------------------------------------------------- obfuscation (NNSplitter-style)

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
