"""The secret key: one class label per trigger, kept in its own JSON file."""
import hashlib
import json
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


def key_sha256(labels):
    """The hash that binds a key to the trigger set made with it (recorded in the trigger metadata)."""
    return hashlib.sha256(json.dumps([int(x) for x in labels]).encode()).hexdigest()


def key_payload(labels, num_classes, source):
    return {"labels": labels, "num_classes": num_classes, "source": source}


def save_key(path, labels, num_classes, source):
    atomic_write_json(key_payload(labels, num_classes, source), path)


def load_key(path):
    """(labels, number of classes or None) from a key file; one clear error for a missing or malformed one."""
    if os.path.isdir(path):
        raise UserError(f"key file {path} is a folder, not a key file")
    if not os.path.exists(path):
        raise UserError(f"key file not found: {path}")
    key = read_json(path, "key file", expect=dict)
    labels, num_classes = key.get("labels"), key.get("num_classes")
    if not isinstance(labels, list) or not labels or not all(isinstance(x, int) and not isinstance(x, bool)
                                                              and x >= 0 for x in labels):
        raise UserError(f"key file {path} is malformed: labels must be a non-empty list of class indices")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 2):
        raise UserError(f"key file {path} is malformed: num_classes must be an integer of at least 2")
    return labels, num_classes
