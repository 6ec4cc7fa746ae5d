"""The model zoo: every architecture for every dataset, and the paper's generator."""
import pytest
import torch

from fragile.core.data import DATASETS
from models import ARCHS, ProGANGenerator, build_classifier


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("dataset", ["synthetic", "fashion-mnist", "cifar100"])
def test_every_arch_gives_logits_for_every_dataset(arch, dataset):
    spec = DATASETS[dataset]
    model = build_classifier(arch, spec).eval()
    with torch.no_grad():
        out = model(torch.rand(2, *spec.shape))
    assert out.shape == (2, spec.num_classes) and torch.isfinite(out).all()


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_generator_makes_images_of_the_dataset_shape_in_unit_range(shape):
    gen = ProGANGenerator(shape, latent_dim=16, base_channels=16)
    out = gen(torch.randn(4, 16))
    assert out.shape == (4, *shape) and 0 <= out.min() and out.max() <= 1 and out.std() > 0


def test_an_unknown_arch_is_refused_without_the_suite_above():
    with pytest.raises(ValueError, match="unknown arch 'vgg'"):
        build_classifier("vgg", DATASETS["synthetic"])
