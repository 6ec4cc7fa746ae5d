"""Triggers on disk: the 8-bit grid and storage.

Every trigger method produces real 8-bit images (uint8 tensors). A trigger folder holds them twice, as a
tensor file (triggers.pt) and as one lossless PNG per trigger (png/), plus grid.png and meta.json; the
key lives in its own JSON file beside the folder (fragile.watermark.keys, fragile.watermark.paths).
"""
import os
import time

import torch

from ..core.data import to_float
from ..core.devices import versions
from ..core.io import atomic_save_torch, atomic_write_json, read_json, safe_torch_load
from ..core.cli import UserError

TRIGGER_FORMAT = "fragile-wm-triggers/1"


def quantize(images):
    """Float images in [0, 1] -> uint8, rounding to the nearest of the 256 levels."""
    return images.detach().clamp(0, 1).mul(255).round().to(torch.uint8)


def straight_through_quantize(images):
    """Forward: the 8-bit image; backward: identity. Keeps optimisation on the pixel grid."""
    return images + (images.clamp(0, 1).mul(255).round().div(255) - images).detach()


def save_triggers(folder, triggers, meta, extra=None):
    """triggers.pt (uint8 tensor + metadata), png/NNNN.png (lossless, one per trigger), grid.png, meta.json."""
    from torchvision.io import write_png
    from torchvision.utils import make_grid, save_image

    png_dir = os.path.join(folder, "png")
    os.makedirs(png_dir, exist_ok=True)
    payload = {"format": TRIGGER_FORMAT, "images": triggers.cpu(), "meta": meta}
    payload.update(extra or {})
    atomic_save_torch(payload, os.path.join(folder, "triggers.pt"))
    for old in os.listdir(png_dir):  # a rerun with fewer triggers leaves no stale files behind
        if old.endswith(".png"):
            os.remove(os.path.join(png_dir, old))
    for i, image in enumerate(triggers.cpu()):
        write_png(image, os.path.join(png_dir, f"{i:04d}.png"))
    grid = make_grid(to_float(triggers.cpu()), nrow=min(10, len(triggers)), padding=2, pad_value=1.0)
    save_image(grid, os.path.join(folder, "grid.png"))
    atomic_write_json(meta, os.path.join(folder, "meta.json"))


def trigger_folder(path):
    """The trigger folder (the one holding meta.json and png/) of a path to it, to its png/ folder, or to its
    triggers.pt file."""
    if not os.path.isdir(path):
        return os.path.dirname(os.path.abspath(path))
    return path if os.path.isdir(os.path.join(path, "png")) else os.path.dirname(os.path.abspath(path))


def read_png_folder(folder):
    from torchvision.io import ImageReadMode, decode_png, read_file
    names = sorted(n for n in os.listdir(folder) if n.endswith(".png"))
    if not names:
        raise UserError(f"no PNG triggers in {folder}")
    try:
        images = [decode_png(read_file(os.path.join(folder, n)), ImageReadMode.UNCHANGED) for n in names]
        return torch.stack(images)
    except RuntimeError as e:
        raise UserError(f"cannot read PNG triggers in {folder}: {str(e).splitlines()[0]}") from None


def load_triggers(path):
    """(uint8 triggers, metadata) from a trigger folder (its PNGs), a PNG folder, or a triggers.pt file."""
    if os.path.isdir(path):
        folder = trigger_folder(path)
        png_dir = os.path.join(path, "png") if folder == path else path   # or the PNG folder itself was named
        meta_path = os.path.join(folder, "meta.json")
        meta = read_json(meta_path, "trigger metadata") if os.path.exists(meta_path) else {}
        return read_png_folder(png_dir), meta
    payload = safe_torch_load(path, "trigger file")
    if not isinstance(payload, dict) or payload.get("format") != TRIGGER_FORMAT:
        raise UserError(f"{path} is not a trigger file of this suite")
    images = payload["images"]
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise UserError(f"{path}: triggers must be a uint8 tensor of shape (N, C, H, W)")
    return images, payload.get("meta", {})


def trigger_meta(model_meta, key_file, method, settings, extra):
    return {"weights_sha256": model_meta["weights_sha256"], "arch": model_meta["arch"],
            "dataset": model_meta["dataset"], "input_shape": model_meta["input_shape"],
            "key_file": os.path.basename(key_file), "method": method, "settings": settings,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **versions(), **extra}
