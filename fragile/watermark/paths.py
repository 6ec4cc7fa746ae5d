"""Where a watermark lives beside its checkpoint, for every script: model -> triggers -> key.

    checkpoints/resnet18_cifar10.pt                      the watermarked model
    checkpoints/resnet18_cifar10_triggers_<method>/      its triggers (triggers.pt, png/, grid.png, meta.json)
    checkpoints/resnet18_cifar10_key_<method>.json       the secret key, named in the triggers' meta.json

A trigger set can be named by its folder, its png/ folder or its triggers.pt; the key is the one its
metadata names, beside the trigger folder, unless one is given. The metadata also binds the key by hash: a key
and a trigger set from different runs are refused, never paired.

A new watermark replaces an old one only once it is complete (``save_watermark``): both are written under
staging names first, then swapped in; a swap cut short is rolled back (or finished) by the next run, so the
previous set and its key are never lost and never paired with the new ones.
"""
import os
import shutil
from dataclasses import dataclass

import torch

from ..core.cli import UserError
from ..core.io import atomic_write_json, read_json
from .keys import key_sha256, load_key
from .trigger_io import load_triggers, save_triggers, trigger_folder


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
    """The trigger set at ``triggers`` and its key (``key``, or the one its metadata names), refused when the
    metadata binds another key."""
    if not os.path.exists(triggers):
        folder = triggers[:-len("/png")] if triggers.rstrip("/").endswith("/png") else triggers
        left = f"; an interrupted generate_samples.py left {folder}{PREVIOUS}: rerun it to restore or finish that set" \
            if os.path.exists(folder + PREVIOUS) else ""
        raise UserError(f"triggers not found: {triggers} (run generate_samples.py, or pass --triggers){left}")
    images, meta = load_triggers(triggers)
    path = key_path(triggers, meta, key)
    labels, num_classes = load_key(path)
    if len(labels) != len(images):
        raise UserError(f"key has {len(labels)} labels but there are {len(images)} triggers ({path})")
    bound = meta.get("key_sha256")
    if bound is not None and bound != key_sha256(labels):
        raise UserError(f"key {path} was not made with the triggers {triggers} (their metadata binds another key): "
                        f"pass --key with the key generate_samples.py wrote beside them")
    return Watermark(images, labels, num_classes, meta, triggers, path)


# ----------------------------------------------------------------------------- replacing a watermark safely

STAGED, PREVIOUS = ".new", ".prev"


def _remove(path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def _bound(folder, key_file):
    """True when ``folder`` is a complete trigger set (its meta.json, written last) bound to the key in ``key_file``."""
    meta_path = os.path.join(folder, "meta.json")
    if not (os.path.exists(meta_path) and os.path.exists(key_file)):
        return False
    try:
        meta = read_json(meta_path, "trigger metadata", expect=dict)
        return meta.get("key_sha256") == key_sha256(load_key(key_file)[0])
    except UserError:
        return False


def finish_interrupted_swap(out, key_out):
    """Put right what a ``save_watermark`` cut short left at ``out`` / ``key_out``: finish the swap when the new set
    and its key are both in place, otherwise restore the previous set. Staged leftovers are removed. Returns what
    was done ("finished", "restored") or None when there was nothing to do."""
    done = None
    if os.path.exists(out + PREVIOUS) or os.path.exists(key_out + PREVIOUS):
        if _bound(out, key_out):
            done = "finished"
        else:
            for path in (out, key_out):
                if os.path.exists(path + PREVIOUS):
                    _remove(path)
                    os.replace(path + PREVIOUS, path)
            done = "restored"
        for path in (out + PREVIOUS, key_out + PREVIOUS):
            _remove(path)
    elif not os.path.exists(key_out) and os.path.exists(key_out + STAGED) and _bound(out, key_out + STAGED):
        os.replace(key_out + STAGED, key_out)   # the first set of this name, stopped before its key was renamed
        done = "finished"
    for path in (out + STAGED, key_out + STAGED):
        _remove(path)
    return done


def save_watermark(out, key_out, triggers, meta, key, extra=None, check=None):
    """Write a trigger set and its key so that no interruption pairs a key with triggers it was not made for, nor
    loses the set already there: both are staged under ``.new`` names (``check(staged folder)`` may refuse the
    staged set), then the old pair is moved to ``.prev``, the new pair renamed into place, and ``.prev`` removed."""
    staged_out, staged_key = out + STAGED, key_out + STAGED
    for path in (staged_out, staged_key):
        _remove(path)
    try:
        save_triggers(staged_out, triggers, meta, extra)
        if check is not None:
            check(staged_out)
        atomic_write_json(key, staged_key)
    except BaseException:
        for path in (staged_out, staged_key):
            _remove(path)
        raise
    for path in (key_out, out):
        if os.path.exists(path):
            _remove(path + PREVIOUS)
            os.replace(path, path + PREVIOUS)
    os.replace(staged_out, out)
    os.replace(staged_key, key_out)
    for path in (out + PREVIOUS, key_out + PREVIOUS):
        _remove(path)
