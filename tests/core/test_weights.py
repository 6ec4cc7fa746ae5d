"""The weights as one flat vector, and Gaussian noise on them."""
import copy

import torch

from fragile.core.weights import (add_gaussian_noise, all_weights, count_changed, entry_name, flatten,
                                  matrix_weights, write_flat)
from models import build_classifier
from fragile.core.data import get_spec


def model():
    torch.manual_seed(0)
    return build_classifier("resnet8", get_spec("synthetic"))


def test_flatten_and_write_back_are_inverse_and_keep_the_model_object():
    net = model()
    params = all_weights(net)
    flat = flatten(params)
    assert flat.numel() == sum(p.numel() for p in net.parameters())
    flat[5] += 1.0
    write_flat(params, flat)
    assert torch.equal(flatten(all_weights(net)), flat) and count_changed(net, model()) == 1
    assert all(p.ndim > 1 for p in matrix_weights(net))


def test_entry_name_finds_the_parameter_of_a_flat_index():
    net = model()
    sizes = [(name, p.numel()) for name, p in net.named_parameters()]
    assert entry_name(net, 0) == (sizes[0][0], 0)
    assert entry_name(net, sizes[0][1] + 2) == (sizes[1][0], 2)


def test_noise_is_reproducible_from_the_generator_and_drawn_per_tensor():
    a, b, flat_model = model(), model(), model()
    add_gaussian_noise(a.parameters(), 1e-3, torch.Generator().manual_seed(4))
    add_gaussian_noise(b.parameters(), 1e-3, torch.Generator().manual_seed(4))
    assert count_changed(a, b) == 0 and count_changed(a, model()) > 0
    flat = flatten(all_weights(flat_model))
    add_gaussian_noise([flat], 1e-3, torch.Generator().manual_seed(4))
    write_flat(all_weights(flat_model), flat)
    assert count_changed(flat_model, copy.deepcopy(a)) > 0   # another layout, other draws: both reproducible
