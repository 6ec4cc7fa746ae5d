"""Checkpoint I/O: atomic writes, weights hashes, and loads that never run pickled code.

A checkpoint is a plain dict of tensors and primitive values, read back with
``torch.load(weights_only=True)``: a file that carries a pickled callable is refused, not run.
"""
import hashlib
import json
import os
import pickle
import tempfile
import zipfile

import torch

from .cli import UserError

FORMAT = "fragile-wm/1"


def weights_sha256(state_dict):
    """SHA-256 over every parameter and buffer (name, dtype, shape, raw bytes), in name order."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_sha256(model):
    return weights_sha256(model.state_dict())


def _ensure_writable_dir(path):
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {directory}: {e.strerror}") from None
    if not os.access(directory, os.W_OK):
        raise UserError(f"output folder {directory} is not writable")
    return directory


def atomic_write(path, write_fn, binary=True):
    """Write through a temp file in the target folder, then rename: a crash never leaves half a file."""
    directory = _ensure_writable_dir(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save_torch(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_json(obj, path):
    atomic_write(path, lambda f: json.dump(obj, f, indent=2, sort_keys=False), binary=False)


def atomic_write_text(text, path):
    atomic_write(path, lambda f: f.write(text), binary=False)


def check_writable(path):
    """Fail before hours of work, not after them, when the output cannot be written."""
    _ensure_writable_dir(path)


def read_json(path, what):
    """A JSON file, or one clear error naming what it was meant to be."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{what} {path} is unreadable or not JSON: {e}") from None


def safe_torch_load(path, what="checkpoint"):
    """torch.load with weights_only=True, and one clear error for each way a file can be bad."""
    if not os.path.exists(path):
        raise UserError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "GLOBAL" in str(e):
            raise UserError(f"refusing {what} {path}: it carries pickled code or objects, which are never loaded "
                            f"(only tensors and plain values are accepted)") from None
        raise UserError(f"{what} {path} is corrupt: {first}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{what} {path} is corrupt or not a torch file: {first}") from None


def default_checkpoint_path(arch, dataset, folder="checkpoints"):
    return os.path.join(folder, f"{arch}_{dataset}.pt")


def save_classifier(path, model, meta, **extra):
    """Weights plus metadata, and extra entries of tensors and plain values (for periodic
    checkpoints the optimizer/RNG state as ``train_state``; a robust watermark's trigger set)."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    meta = dict(meta, weights_sha256=weights_sha256(state))
    payload = {"format": FORMAT, "state_dict": state, "meta": meta}
    payload.update({k: v for k, v in extra.items() if v is not None})
    atomic_save_torch(payload, path)
    return meta


def read_checkpoint(path):
    payload = safe_torch_load(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or "state_dict" not in payload:
        raise UserError(f"{path} is not a checkpoint of this suite (expected format {FORMAT})")
    return payload


def load_classifier(path, device="cpu", expect_arch=None, expect_dataset=None):
    """(model in eval mode on ``device``, metadata). Refuses checkpoints for another arch or dataset."""
    from models import ARCHS, build_classifier
    from .data import get_spec

    payload = read_checkpoint(path)
    meta = payload["meta"]
    for key, expected in (("arch", expect_arch), ("dataset", expect_dataset)):
        if expected and meta.get(key) != expected:
            raise UserError(f"checkpoint {path} is for {key} {meta.get(key)!r}, not {expected!r}")
    if meta.get("arch") not in ARCHS:
        raise UserError(f"checkpoint {path} is for unknown arch {meta.get('arch')!r}: this suite builds "
                        f"{', '.join(ARCHS)}")
    model = build_classifier(meta["arch"], get_spec(meta["dataset"]))
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        raise UserError(f"checkpoint {path} does not fit arch {meta['arch']!r}: "
                        f"{str(e).splitlines()[0]}") from None
    return model.to(device).eval(), meta
