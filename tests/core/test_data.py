"""Datasets as uint8 tensors, on-device augmentation, and batches sharded across torchrun ranks."""
import dataclasses
import os

import pytest
import torch

from conftest import ROOT, requires_fashion_mnist
from fragile.core.cli import UserError
from fragile.core.data import (augment, balanced_subset, get_spec, load_dataset, load_split, random_crop, random_flip,
                               synthetic_split, to_float, train_batches)


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


@requires_fashion_mnist
def test_processes_staging_one_fresh_data_folder_at_once_all_succeed(tmp_path):
    """torchrun's ranks, or runs side by side, on one fresh --data-dir: one unpacks Debian's files, the others wait
    for it (each unpacking through a temporary name of its own), and every process reads the same data."""
    import subprocess
    import sys
    code = ("import sys, torch; from fragile.core.data import get_spec, load_split; "
            "s = load_split(get_spec('fashion-mnist'), sys.argv[1], True); print(len(s), int(s.labels.sum()))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, env={**os.environ,
                              "PYTHONPATH": ROOT}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-500:] for _, err in outputs]
    assert len({out for out, _ in outputs}) == 1 and outputs[0][0].startswith("60000 ")
    raw = tmp_path / "FashionMNIST" / "raw"
    assert sorted(os.listdir(raw)) == sorted(["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"])


# ----------------------------------------------------------------------------- sharding across ranks

def cifar_like_spec():
    return dataclasses.replace(get_spec("synthetic"), crop_padding=4, horizontal_flip=True)


def batches(split, spec, rank, world_size, seed=0, batch_size=64):
    gen = torch.Generator().manual_seed(seed)
    return list(train_batches(split, batch_size, spec, gen, rank=rank, world_size=world_size))


def test_the_ranks_slices_make_up_the_single_process_batches():
    spec = cifar_like_spec()
    split = synthetic_split(spec, True, n=300)   # 4 full batches of 64 and a last one of 44
    single = batches(split, spec, 0, 1)
    shards = [batches(split, spec, rank, 2) for rank in range(2)]
    assert len(single) == len(shards[0]) == len(shards[1]) == 5
    for whole, part0, part1 in zip(single, *shards):
        assert len(part0[1]) == len(part1[1]) == len(whole[1]) // 2   # the global batch, split evenly
        assert torch.equal(torch.cat([part0[0], part1[0]]), whole[0])  # same images, same augmentation
        assert torch.equal(torch.cat([part0[1], part1[1]]), whole[1])


def test_single_process_batches_are_those_of_the_unsharded_loader():
    """rank 0 of 1 draws exactly what the loader drew before sharding existed: permutation, then crops
    and flips of the whole batch."""
    spec = cifar_like_spec()
    split = synthetic_split(spec, True, n=200)
    gen = torch.Generator().manual_seed(3)
    order = torch.randperm(len(split), generator=gen)
    expected = [(to_float(augment(split.images[order[s:s + 64]], spec, gen)), split.labels[order[s:s + 64]])
                for s in range(0, len(split), 64)]
    for (images, labels), (want_images, want_labels) in zip(batches(split, spec, 0, 1, seed=3), expected):
        assert torch.equal(images, want_images) and torch.equal(labels, want_labels)


def test_the_same_seed_gives_the_same_order_for_a_world_size():
    spec = cifar_like_spec()
    split = synthetic_split(spec, True, n=256)
    first, again, other = (batches(split, spec, 1, 2, seed=seed) for seed in (5, 5, 6))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(first, other))


def test_a_last_batch_smaller_than_the_world_is_dropped():
    spec = get_spec("synthetic")
    split = synthetic_split(spec, True, n=65)   # one batch of 64, then one image for two ranks
    assert [len(labels) for _, labels in batches(split, spec, 1, 2)] == [32]
