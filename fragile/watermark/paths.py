"""Where a watermark lives beside its checkpoint, for every script: model -> triggers -> key.

    checkpoints/resnet18_cifar10.pt                      the watermarked model
    checkpoints/resnet18_cifar10_triggers_<method>/      its triggers (triggers.pt, png/, grid.png, meta.json)
    checkpoints/resnet18_cifar10_key_<method>.json       the secret key, named in the triggers' meta.json

A trigger set can be named by its folder, its png/ folder or its triggers.pt; the key is the one its
metadata names, beside the trigger folder, unless one is given.
"""
import os
from dataclasses import dataclass

import torch

from ..core.cli import UserError
from .keys import load_key
from .trigger_io import load_triggers, trigger_folder


def default_paths(model_path, method):
    """Trigger folder and key file derived from the checkpoint path and the method."""
    stem = model_path[:-3] if model_path.endswith(".pt") else model_path
    return f"{stem}_triggers_{method}", f"{stem}_key_{method}.json"


def triggers_path(model_path, method, given=""):
    """``given`` if set, else the method's default trigger folder beside the checkpoint."""
    return given or default_paths(model_path, method)[0]


def key_path(triggers, meta, given=""):
    """``given`` if set, else the key file the trigger metadata names, beside the trigger folder."""
    if given:
        return given
    if not meta.get("key_file"):
        raise UserError("no --key given and the trigger metadata names no key file")
    return os.path.join(os.path.dirname(os.path.abspath(trigger_folder(triggers))), meta["key_file"])


def tensor_file(triggers):
    """The triggers.pt of a trigger set (the PNGs' twin), or None when it has none."""
    if os.path.isfile(triggers):
        return triggers
    path = os.path.join(trigger_folder(triggers), "triggers.pt")
    return path if os.path.exists(path) else None


@dataclass
class Watermark:
    """A trigger set and its key, as read from disk."""
    triggers: torch.Tensor      # uint8 (N, C, H, W)
    key: list                   # one label per trigger
    num_classes: int            # as the key file records it (None in keys that predate it)
    meta: dict                  # the trigger metadata (method, query order, envelope, delta, ...)
    triggers_path: str
    key_path: str


def load_watermark(triggers, key=""):
    """The trigger set at ``triggers`` and its key (``key``, or the one its metadata names)."""
    if not os.path.exists(triggers):
        raise UserError(f"triggers not found: {triggers} (run generate_samples.py, or pass --triggers)")
    images, meta = load_triggers(triggers)
    path = key_path(triggers, meta, key)
    labels, num_classes = load_key(path)
    return Watermark(images, labels, num_classes, meta, triggers, path)
