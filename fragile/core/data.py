"""Datasets as uint8 tensors on the training device, with on-device augmentation (airbench style).

Every dataset knows its image shape, classes, normalization and train-time augmentation. Images
stay uint8 until a batch is drawn; the model's first layer normalizes, so every model input is an
image in [0, 1] -- training images and triggers alike.
"""
import contextlib
import fcntl
import gzip
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .cli import UserError

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    shape: tuple            # (channels, height, width)
    class_names: tuple
    mean: tuple
    std: tuple
    crop_padding: int       # random-crop padding at train time (0: no crop)
    horizontal_flip: bool   # random horizontal flips at train time

    @property
    def num_classes(self):
        return len(self.class_names)


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")

DATASETS = {
    "cifar10": DatasetSpec("cifar10", (3, 32, 32), CIFAR10_CLASSES,
                           (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), 4, True),
    "cifar100": DatasetSpec("cifar100", (3, 32, 32), tuple(f"class{i}" for i in range(100)),
                            (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 4, True),
    "fashion-mnist": DatasetSpec("fashion-mnist", (1, 28, 28), FASHION_CLASSES, (0.2860,), (0.3530,), 2, True),
    "mnist": DatasetSpec("mnist", (1, 28, 28), tuple(str(i) for i in range(10)), (0.1307,), (0.3081,), 2, False),
    # In-memory stand-in for CIFAR-10 (no download): smooth class prototypes plus noise.
    "synthetic": DatasetSpec("synthetic", (3, 32, 32), tuple(f"proto{i}" for i in range(10)),
                             (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 2, False),
}


def get_spec(name):
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


# ----------------------------------------------------------------------------- loading

@dataclass
class Split:
    """One split as tensors: images uint8 (N, C, H, W), labels int64 (N,)."""
    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self):
        return len(self.labels)

    def to(self, device):
        return Split(self.images.to(device), self.labels.to(device))

    def subset(self, index):
        return Split(self.images[index], self.labels[index])


def _offline_error(spec, data_dir, cause):
    fix = f"put a copy under {data_dir} or pass --data-dir DIR pointing at one"
    if spec.name == "fashion-mnist":
        fix += " (offline: `apt-get install dataset-fashion-mnist` provides it)"
    return UserError(f"dataset {spec.name} is not in {data_dir} and could not be downloaded "
                     f"({type(cause).__name__}): {fix}")


def _stage_debian_fashion_mnist(root):
    """Unpack Debian's Fashion-MNIST idx files where torchvision looks for its raw download. Each file goes
    through a temporary name of its own and is renamed into place, so processes unpacking at once never
    trip over each other's half-written files."""
    raw = os.path.join(root, "FashionMNIST", "raw")
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        target = os.path.join(raw, name)
        source = os.path.join(DEBIAN_FASHION_MNIST, name + ".gz")
        if os.path.exists(target) or not os.path.exists(source):
            continue
        os.makedirs(raw, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=raw, prefix=f".{name}.", suffix=".tmp")
        try:
            with gzip.open(source, "rb") as src, os.fdopen(fd, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


@contextlib.contextmanager
def data_dir_lock(data_dir):
    """Hold an exclusive lock on ``data_dir`` while its files are staged or downloaded: of several processes on
    one folder (torchrun's ranks, two runs side by side) one stages, the others wait and then find the files."""
    try:
        os.makedirs(data_dir, exist_ok=True)
        handle = open(os.path.join(data_dir, ".fragile-data.lock"), "a")
    except OSError:   # a read-only data folder: nothing can be written there, so nothing can race
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _torchvision_split(spec, data_dir, train):
    import torchvision.datasets as tvd  # imported lazily: tests on synthetic data never need it
    cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100, "fashion-mnist": tvd.FashionMNIST, "mnist": tvd.MNIST}[spec.name]
    with data_dir_lock(data_dir):
        if spec.name == "fashion-mnist":
            _stage_debian_fashion_mnist(data_dir)
        try:
            # torchvision verifies each file's checksum before reading it (CIFAR's batches are pickles:
            # only files matching the published MD5 are ever opened).
            ds = cls(data_dir, train=train, download=False)
        except RuntimeError:
            try:
                ds = cls(data_dir, train=train, download=True)
            except Exception as e:  # URLError, socket errors, checksum failures
                raise _offline_error(spec, data_dir, e) from None
    images = torch.as_tensor(ds.data)
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
    return Split(images.contiguous(), torch.as_tensor(ds.targets, dtype=torch.long))


def synthetic_split(spec, train, n=None, seed=1234):
    """Smooth random class prototypes plus per-sample smooth and pixel noise: learnable, not trivial."""
    n = n or (5000 if train else 1000)
    c, h, w = spec.shape
    gen = torch.Generator().manual_seed(seed)  # prototypes: shared by both splits
    # Low-contrast prototypes and strong structured noise: classes overlap, so a tiny model learns them
    # without becoming trivially confident (triggers need boundaries to sit near).
    protos = 0.3 + 0.4 * F.interpolate(torch.rand(spec.num_classes, c, 4, 4, generator=gen), size=(h, w),
                                       mode="bilinear", align_corners=False)
    gen = torch.Generator().manual_seed(seed + (1 if train else 2))
    labels = torch.randint(0, spec.num_classes, (n,), generator=gen)
    smooth = F.interpolate(torch.randn(n, c, 8, 8, generator=gen), size=(h, w), mode="bilinear", align_corners=False)
    images = protos[labels] + 0.3 * smooth + 0.1 * torch.randn(n, c, h, w, generator=gen)
    return Split((images.clamp(0, 1) * 255).round().to(torch.uint8), labels)


def load_split(spec, data_dir, train):
    if spec.name == "synthetic":
        return synthetic_split(spec, train)
    return _torchvision_split(spec, data_dir, train)


def balanced_subset(split, n, num_classes, seed=0):
    """n samples, as equal per class as the data allows, chosen reproducibly."""
    if not n or n >= len(split):
        return split
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(split), generator=gen)
    per_class = -(-n // num_classes)
    chosen = torch.cat([order[split.labels[order] == k][:per_class] for k in range(num_classes)])
    chosen = chosen[torch.randperm(len(chosen), generator=gen)][:n]
    return split.subset(chosen)


def load_dataset(name, data_dir="data", device="cpu", train_subset=0, seed=0):
    """(spec, train split, test split), the splits already on ``device``."""
    spec = get_spec(name)
    train = balanced_subset(load_split(spec, data_dir, True), train_subset, spec.num_classes, seed)
    test = load_split(spec, data_dir, False)
    return spec, train.to(device), test.to(device)


# ----------------------------------------------------------------------------- batches

def to_float(images):
    """uint8 images -> float in [0, 1] (the model normalizes internally)."""
    return images.float().div_(255)


def random_crop(images, padding, gen, draw=None):
    """Per-sample random crops of a whole batch at once: pad, then gather shifted windows. ``draw`` (drawn,
    kept): draw offsets for ``drawn`` samples and use the ``kept`` slice of them (a rank's share of a batch)."""
    n, _, h, w = images.shape
    drawn, kept = draw or (n, slice(None))
    padded = F.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (drawn,), device=images.device, generator=gen)[kept]
    dx = torch.randint(0, 2 * padding + 1, (drawn,), device=images.device, generator=gen)[kept]
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, :, None]
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, :]
    batch = torch.arange(n, device=images.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def random_flip(images, gen, draw=None):
    drawn, kept = draw or (len(images), slice(None))
    flip = (torch.rand(drawn, device=images.device, generator=gen) < 0.5)[kept]
    return torch.where(flip[:, None, None, None], images.flip(3), images)


def augment(images, spec, gen, draw=None):
    """The dataset's train-time augmentation, on the device, per sample, one batch at a time."""
    if spec.crop_padding:
        images = random_crop(images, spec.crop_padding, gen, draw)
    if spec.horizontal_flip:
        images = random_flip(images, gen, draw)
    return images


def shard(n, rank, world_size):
    """Rank ``rank``'s contiguous slice of a batch of ``n``: equal parts (n / world_size) for a full batch."""
    return slice(n * rank // world_size, n * (rank + 1) // world_size)


def train_batches(split, batch_size, spec, gen, augmented=True, drop_last=False, rank=0, world_size=1):
    """Shuffled (float images in [0,1], labels) batches; augmentation on the device.

    Data parallel (``world_size`` > 1): every rank draws the same permutation and the same augmentation
    numbers for the whole global batch of ``batch_size`` from the same seeded generator, then keeps its
    slice. So the global batches are those of a single process with the same seed, for any world size,
    and the generator stays in step on every rank. A last batch too small to give every rank an image
    is dropped (a rank cannot step on none)."""
    order = torch.randperm(len(split), device=split.images.device, generator=gen)
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    for start in range(0, stop, batch_size):
        index = order[start:start + batch_size]
        if len(index) < world_size:
            break
        kept = shard(len(index), rank, world_size)
        images = split.images[index[kept]]
        if augmented:
            images = augment(images, spec, gen, (len(index), kept))
        yield to_float(images), split.labels[index[kept]]


def device_generator(device, seed):
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen
