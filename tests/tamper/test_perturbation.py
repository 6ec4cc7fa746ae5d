"""Every weight perturbation, once: what each does to the weights, bit for bit."""
import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from fragile.core.cli import UserError
from fragile.core.data import get_spec, synthetic_split, to_float
from fragile.core.weights import all_weights, count_changed, flatten, matrix_weights
from fragile.tamper.compression import QUANTIZERS, magnitude_prune
from fragile.tamper.obfuscate import obfuscate
from fragile.tamper.perturbation import BIT_CLASSES, flip_bits, nudge_one_weight, trial_generator
from models import build_classifier

SPEC = get_spec("synthetic")


def model():
    torch.manual_seed(0)
    return build_classifier("resnet8", SPEC).eval()


def test_a_bit_flip_changes_exactly_one_bit_of_each_chosen_weight():
    gen = torch.Generator().manual_seed(0)
    flat = torch.randn(1000, generator=gen)
    positions = torch.randperm(1000, generator=gen)[:50]
    for bit_class, bits in BIT_CLASSES.items():
        chosen = [bits[i] for i in torch.randint(len(bits), (50,), generator=gen).tolist()]
        flipped = flip_bits(flat, positions, chosen)
        diff = torch.bitwise_xor(flat.view(torch.int32), flipped.view(torch.int32))
        changed = diff.nonzero().flatten()
        assert sorted(changed.tolist()) == sorted(positions.tolist()), bit_class
        for position, bit in zip(positions.tolist(), chosen):
            assert int(diff[position]) & 0xFFFFFFFF == 1 << bit  # exactly that one bit
        if bit_class == "sign":
            assert torch.equal(flipped[positions], -flat[positions])
    with pytest.raises(UserError, match="float32"):
        flip_bits(flat.double(), positions, chosen)


def test_magnitude_pruning_zeroes_the_stated_fraction_smallest_first():
    layer = torch.nn.Linear(40, 25)
    params = matrix_weights(layer)
    before = flatten(params)
    zeroed = magnitude_prune(params, 0.3)
    after = flatten(params)
    assert zeroed == round(0.3 * 1000) and int((after == 0).sum()) == zeroed
    assert before[after == 0].abs().max() <= before[after != 0].abs().min()
    assert torch.equal(after[after != 0], before[after != 0])


def test_one_weight_is_scaled_or_shifted_and_only_that_one():
    flat = torch.arange(1.0, 11.0)
    index = nudge_one_weight(flat, torch.Generator().manual_seed(1), 0.5, candidates=torch.tensor([2, 7]))
    assert index in (2, 7) and flat[index].item() in (0.5 * (index + 1), 1.5 * (index + 1))
    assert int((flat != torch.arange(1.0, 11.0)).sum()) == 1
    shifted = torch.zeros(10)
    index = nudge_one_weight(shifted, torch.Generator().manual_seed(1), 1e-3, relative=False)
    assert shifted[index].item() == pytest.approx(1e-3) and int((shifted != 0).sum()) == 1
    fixed = torch.ones(10)
    assert nudge_one_weight(fixed, torch.Generator().manual_seed(0), 1.0, index=4) == 4 and fixed[4] in (0.0, 2.0)


def test_trial_generators_reproduce_and_differ_between_points():
    draw = lambda *salt: torch.rand(3, generator=trial_generator(0, *salt))  # noqa: E731
    assert torch.equal(draw("noise", 1e-3), draw("noise", 1e-3))
    assert not torch.equal(draw("noise", 1e-3), draw("noise", 1e-2))


def test_bounded_obfuscation_changes_exactly_k_weights_within_their_layers_and_raises_the_loss():
    net, data = model(), synthetic_split(SPEC, True, n=64)
    batches = itertools.repeat((to_float(data.images), data.labels))
    bounds = [p.detach().abs().max() for p in matrix_weights(net)]
    before, after = obfuscate(net, 7, batches, steps=4, step_size=0.05)
    assert after > before and count_changed(net, model()) == 7
    assert all(p.abs().max() <= bound for p, bound in zip(matrix_weights(net), bounds))


def test_one_unbounded_std_step_is_the_comparisons_one_shot_obfuscation():
    """A single step of std size, unbounded, is what the comparison measured: each chosen weight moved
    ``scale`` standard deviations of its tensor in the loss-increasing direction."""
    net, data = model(), synthetic_split(SPEC, True, n=64)
    batch = (to_float(data.images), data.labels)
    reference = copy.deepcopy(net)
    weights = matrix_weights(reference)
    grads = torch.autograd.grad(F.cross_entropy(reference(batch[0]), batch[1]), weights)
    flat_grad = torch.cat([g.flatten() for g in grads])
    chosen = int(flat_grad.abs().argmax())
    offsets = torch.tensor([0] + [p.numel() for p in weights]).cumsum(0)
    t = int(torch.searchsorted(offsets, chosen, right=True)) - 1
    with torch.no_grad():
        p = weights[t]
        p.view(-1)[chosen - offsets[t]] += 10.0 * p.std() * flat_grad[chosen].sign()
    obfuscate(net, 1, itertools.repeat(batch), steps=1, step_size=10.0, scale="std", bounded=False)
    assert torch.equal(flatten(all_weights(net)), flatten(all_weights(reference)))


@pytest.mark.parametrize("mode", list(QUANTIZERS))
def test_every_quantizer_moves_weights_and_keeps_shapes(mode):
    net = model()
    QUANTIZERS[mode](net)
    assert count_changed(net, model()) > 0 and [p.shape for p in net.parameters()] == [p.shape for p in model().parameters()]
