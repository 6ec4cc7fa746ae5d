"""The secret key: one class label per trigger, kept in its own JSON file."""
import os
import secrets

import torch

from ..core.cli import UserError
from ..core.io import atomic_write_json, read_json


def make_key(n, num_classes, seed=None):
    """n labels, from the OS's cryptographically secure source unless ``seed`` makes them reproducible."""
    if seed is None:
        rng = secrets.SystemRandom()
        return [rng.randrange(num_classes) for _ in range(n)], "os-csprng"
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_classes, (n,), generator=gen).tolist(), f"seed {seed}"


def save_key(path, labels, num_classes, source):
    atomic_write_json({"labels": labels, "num_classes": num_classes, "source": source}, path)


def load_key(path):
    """(labels, number of classes or None) from a key file; one clear error for a missing or malformed one."""
    if not os.path.exists(path):
        raise UserError(f"key file not found: {path}")
    key = read_json(path, "key file")
    try:
        labels = key["labels"]
        if not isinstance(labels, list) or not all(isinstance(x, int) for x in labels):
            raise ValueError("labels must be a list of integers")
        return labels, int(key.get("num_classes", 0)) or None
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"key file {path} is malformed: {e}") from None
