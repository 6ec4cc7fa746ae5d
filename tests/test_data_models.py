"""Datasets, on-device augmentation and the model zoo."""
import pytest
import torch

from conftest import requires_fashion_mnist
from fragile.cli import UserError
from fragile.data import (DATASETS, augment, balanced_subset, get_spec, load_dataset, load_split, random_crop,
                          random_flip, train_batches)
from models import ARCHS, ProGANGenerator, build_classifier


def test_synthetic_split_shapes_and_ranges():
    spec = get_spec("synthetic")
    split = load_split(spec, "unused", train=True)
    assert split.images.dtype == torch.uint8 and tuple(split.images.shape[1:]) == spec.shape
    assert split.labels.min() >= 0 and split.labels.max() == spec.num_classes - 1
    assert split.images.float().std() > 20  # real content, not a constant image


def test_random_crop_differs_per_sample_and_is_a_shifted_window():
    gen = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8)
    batch = image.repeat(64, 1, 1, 1)
    out = random_crop(batch, 2, gen)
    assert out.shape == batch.shape
    distinct = {tuple(o.flatten()[:40].tolist()) for o in out}
    assert len(distinct) > 5  # different offsets for different samples of one batch
    padded = torch.nn.functional.pad(image, (2, 2, 2, 2))[0]
    windows = {tuple(padded[:, dy:dy + 16, dx:dx + 16].flatten().tolist()) for dy in range(5) for dx in range(5)}
    assert all(tuple(o.flatten().tolist()) in windows for o in out)


def test_random_flip_flips_some_samples_only():
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (1, 1, 8, 8), dtype=torch.uint8).repeat(64, 1, 1, 1)
    out = random_flip(batch, gen)
    flipped = (out == batch.flip(3)).flatten(1).all(1)
    kept = (out == batch).flatten(1).all(1)
    assert (flipped | kept).all() and 10 < flipped.sum() < 54


def test_train_batches_keep_labels_and_cover_data():
    spec = get_spec("synthetic")
    split = load_split(spec, "unused", train=False)
    gen = torch.Generator().manual_seed(0)
    seen = torch.zeros(len(split), dtype=torch.long)
    images_all, labels_all = [], []
    for images, labels in train_batches(split, 128, spec, gen):
        assert images.dtype == torch.float32 and 0 <= images.min() and images.max() <= 1
        images_all.append(images), labels_all.append(labels)
    labels_all = torch.cat(labels_all)
    assert sorted(labels_all.tolist()) == sorted(split.labels.tolist())  # a permutation: labels unchanged


def test_balanced_subset_is_class_balanced():
    spec = get_spec("synthetic")
    split = balanced_subset(load_split(spec, "unused", train=True), 500, spec.num_classes)
    counts = torch.bincount(split.labels, minlength=spec.num_classes)
    assert len(split) == 500 and counts.min() == counts.max() == 50


def test_unknown_dataset_is_a_user_error():
    with pytest.raises(UserError, match="unknown dataset"):
        get_spec("imagenet")


def test_offline_download_failure_names_the_fix(tmp_path):
    with pytest.raises(UserError, match="--data-dir"):
        load_dataset("cifar10", str(tmp_path))


@requires_fashion_mnist
def test_fashion_mnist_from_debian_package(tmp_path):
    spec, train, test = load_dataset("fashion-mnist", str(tmp_path), train_subset=1000)
    assert tuple(train.images.shape) == (1000, 1, 28, 28) and len(test) == 10000
    assert torch.bincount(train.labels).tolist() == [100] * 10


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
