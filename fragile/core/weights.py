"""A model's parameters as one flat vector, and Gaussian noise on them.

The tamper suite (fragile.tamper) changes weights through this view; trigger generation
(fragile.watermark.methods.fragility) adds the same noise to rank triggers by how easily a random
tamper exposes them, which is why the noise lives here, below both.

"Weights" are every trainable parameter (convolution and linear weights, biases, BatchNorm scales and
shifts); ``matrix_weights`` are the convolution and linear weights alone. BatchNorm running statistics
are buffers, not weights.
"""
import torch


def all_weights(model):
    return list(model.parameters())


def matrix_weights(model):
    """Convolution and linear weights: what pruning and NNSplitter-style obfuscation act on."""
    return [p for p in model.parameters() if p.ndim > 1]


@torch.no_grad()
def flatten(params):
    """A detached copy of ``params`` as one vector."""
    return torch.cat([p.detach().reshape(-1) for p in params]).clone()


@torch.no_grad()
def write_flat(params, flat):
    """Copy the vector ``flat`` back into ``params`` (in place: the model object stays the same)."""
    offset = 0
    for p in params:
        p.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


def entry_name(model, index):
    """The parameter name and the index inside it of entry ``index`` of the flattened weights."""
    for name, p in model.named_parameters():
        if index < p.numel():
            return name, index
        index -= p.numel()
    raise IndexError("entry past the last weight")


def count_changed(model, reference):
    """Parameter entries that differ, bit for bit, between two models of the same architecture."""
    a, b = flatten(all_weights(model)), flatten(all_weights(reference))
    return int((a.view(torch.int32) != b.view(torch.int32)).sum()) if a.dtype == torch.float32 else int((a != b).sum())


def state_changed(model, reference):
    """Whether anything in the state (weights and buffers such as batch-norm statistics) differs, bit for bit:
    recomputed, so that a tampering that changed nothing is recorded as no change."""
    return any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


@torch.no_grad()
def add_gaussian_noise(tensors, sigma, gen):
    """Gaussian noise of standard deviation ``sigma`` added to each tensor in place, drawn tensor by tensor from
    the CPU generator ``gen`` (the same draws on any device). Pass ``model.parameters()`` to noise a model, or a
    flattened vector as one tensor: the draws differ between the two layouts, each is reproducible."""
    for t in tensors:
        t.add_(sigma * torch.randn(t.shape, generator=gen).to(t.device))
