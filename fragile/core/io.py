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

from .cli import UserError, first_line

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


def _writable_folder(directory):
    """``directory``, created if missing; one error line when it cannot be created or written."""
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {directory}: {e.strerror}") from None
    if not os.access(directory, os.W_OK):
        raise UserError(f"output folder {directory} is not writable")
    return directory


def _ensure_writable_dir(path):
    return _writable_folder(os.path.dirname(os.path.abspath(path)))


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


def check_writable(path, flag="--out"):
    """Fail before hours of work, not after them, when the output file cannot be written: its folder must be
    writable and the path itself must not be a folder."""
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder: give a file path (for example {os.path.join(path, 'model.pt')})")
    _ensure_writable_dir(path)


def check_writable_dir(path, flag):
    """The same for an output folder (created here if missing): fail now, not after the work."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is a file, not a folder: give a folder")
    _writable_folder(path)


def refuse_existing(path, overwrite, what, flag="--out"):
    """Outputs that exist are replaced only when asked: one line naming the file and the two ways on."""
    if os.path.exists(path) and not overwrite:
        raise UserError(f"{what} {path} exists: pass --overwrite to replace it, or {flag} elsewhere")


def read_json(path, what, expect=None):
    """A JSON file, or one clear error naming what it was meant to be; ``expect`` (dict or list) is the type the
    top level must have."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else e
        raise UserError(f"{what} {path} is unreadable or not JSON: {reason}") from None
    if expect is not None and not isinstance(value, expect):
        raise UserError(f"{what} {path} is malformed: expected a JSON {'object' if expect is dict else 'list'}, "
                        f"not {type(value).__name__}")
    return value


def safe_torch_load(path, what="checkpoint"):
    """torch.load with weights_only=True, and one clear error for each way a file can be bad."""
    if not os.path.exists(path):
        raise UserError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Unsupported global" in text or "GLOBAL" in text:   # a class or callable to import: refused
            raise UserError(f"refusing {what} {path}: it carries pickled code or objects, which are never loaded "
                            f"(only tensors and plain values are accepted)") from None
        detail = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()[0] if text.strip() else ""
        raise UserError(f"{what} {path} is corrupt or not a torch file ({detail[:120]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise UserError(f"{what} {path} is corrupt or not a torch file: {first_line(e)}") from None
    except Exception as e:  # torch's reader fails on arbitrary bytes in many ways (KeyError on a text file, ...)
        raise UserError(f"{what} {path} is corrupt or not a torch file ({type(e).__name__} while reading it)") from None


def default_checkpoint_path(arch, dataset, folder="checkpoints"):
    return os.path.join(folder, f"{arch}_{dataset}.pt")


def training_log_path(checkpoint):
    """train.py's per-epoch log beside ``checkpoint``: <out>.log.jsonl."""
    return (checkpoint[:-3] if checkpoint.endswith(".pt") else checkpoint) + ".log.jsonl"


def logged_training_seconds(checkpoint):
    """The training seconds train.py logged for ``checkpoint`` (its last epoch line, counted across resumes);
    None when it has no log (a checkpoint trained elsewhere)."""
    path = training_log_path(checkpoint)
    if not os.path.exists(path):
        return None
    lines = open(path).read().splitlines()
    return json.loads(lines[-1])["seconds"] if lines else None


def save_classifier(path, model, meta, **extra):
    """Weights plus metadata, and extra entries of tensors and plain values (for periodic
    checkpoints the optimizer/RNG state as ``train_state``; a robust watermark's trigger set)."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    meta = {k: v for k, v in meta.items() if k != "stored_weights_sha256"}   # load_classifier's note, not data
    meta["weights_sha256"] = weights_sha256(state)
    payload = {"format": FORMAT, "state_dict": state, "meta": meta}
    payload.update({k: v for k, v in extra.items() if v is not None})
    atomic_save_torch(payload, path)
    return meta


def read_checkpoint(path, what="checkpoint"):
    """A checkpoint's payload, its structure checked: a dict of tensors under ``state_dict`` and a metadata dict
    naming the arch and dataset. Anything else is one error line naming the file."""
    if os.path.isdir(path):
        raise UserError(f"{what} {path} is a folder, not a checkpoint file")
    payload = safe_torch_load(path, what)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path} is not a checkpoint of this suite (expected format {FORMAT})")
    state, meta = payload.get("state_dict"), payload.get("meta")
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise UserError(f"checkpoint {path} is malformed: its state_dict is not a dict of named tensors")
    if not isinstance(meta, dict) or not all(isinstance(meta.get(k), str) for k in ("arch", "dataset")):
        raise UserError(f"checkpoint {path} is malformed: its metadata does not name an arch and a dataset")
    return payload


def load_classifier(path, device="cpu", expect_arch=None, expect_dataset=None):
    """(model in eval mode on ``device``, metadata). Refuses checkpoints for another arch or dataset.

    What the file says about itself is not trusted where it can be recomputed: ``weights_sha256`` in the
    returned metadata is hashed from the weights actually loaded (the file's own claim is kept as
    ``stored_weights_sha256``), and the input shape and class count are the dataset's, checked against the
    file's."""
    from models import ARCHS, build_classifier
    from .data import DATASETS

    payload = read_checkpoint(path)
    meta = dict(payload["meta"])
    for key, expected in (("arch", expect_arch), ("dataset", expect_dataset)):
        if expected and meta.get(key) != expected:
            raise UserError(f"checkpoint {path} is for {key} {meta.get(key)!r}, not {expected!r}")
    if meta["arch"] not in ARCHS:
        raise UserError(f"checkpoint {path} is for unknown arch {meta['arch']!r}: this suite builds "
                        f"{', '.join(ARCHS)}")
    if meta["dataset"] not in DATASETS:
        raise UserError(f"checkpoint {path} is for unknown dataset {meta['dataset']!r}: this suite knows "
                        f"{', '.join(DATASETS)}")
    spec = DATASETS[meta["dataset"]]
    for key, actual in (("input_shape", list(spec.shape)), ("num_classes", spec.num_classes)):
        if key in meta and meta[key] != actual:
            raise UserError(f"checkpoint {path} is malformed: its metadata says {key} {meta[key]!r}, but "
                            f"{meta['dataset']} has {actual!r}")
    model = build_classifier(meta["arch"], spec)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        raise UserError(f"checkpoint {path} does not fit arch {meta['arch']!r}: "
                        f"{str(e).splitlines()[0]}") from None
    meta.update(input_shape=list(spec.shape), num_classes=spec.num_classes,
                stored_weights_sha256=meta.get("weights_sha256"), weights_sha256=model_sha256(model))
    return model.to(device).eval(), meta
