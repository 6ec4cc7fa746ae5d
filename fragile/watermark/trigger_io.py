"""Triggers on disk: the 8-bit grid and storage.

Every trigger method produces real 8-bit images (uint8 tensors). A trigger folder holds them twice, as a
tensor file (triggers.pt) and as one lossless PNG per trigger (png/), plus grid.png and meta.json; the
key lives in its own JSON file beside the folder (fragile.watermark.keys, fragile.watermark.paths).
"""
import os
import struct
import time

import torch

from ..core.data import to_float
from ..core.devices import versions
from ..core.io import atomic_save_torch, atomic_write_json, read_json, safe_torch_load
from ..core.cli import UserError

TRIGGER_FORMAT = "fragile-wm-triggers/1"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_COLOR_TYPES = {0: 1, 2: 3}      # PNG colour type -> channels: 8-bit grayscale and 8-bit RGB, as write_png writes
MAX_SIDE = 1024                     # largest trigger side accepted before decoding (a decompression bomb declares more)
MAX_PNG_BYTES = 16 << 20
MAX_TRIGGERS = 100_000


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


def png_header(path):
    """(channels, height, width) that a PNG declares in its IHDR chunk, read before anything is decoded; refused
    unless it is an 8-bit grayscale or RGB PNG (16-bit, 1-bit, palette and alpha PNGs decode to other values than
    the triggers the key was made for) of at most MAX_SIDE pixels a side."""
    if os.path.getsize(path) > MAX_PNG_BYTES:
        raise UserError(f"trigger {path} is larger than {MAX_PNG_BYTES >> 20} MiB: not a trigger image")
    with open(path, "rb") as f:
        head = f.read(33)
    if len(head) < 33 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise UserError(f"trigger {path} is not a PNG file")
    width, height, bit_depth, color_type = struct.unpack(">IIBB", head[16:26])
    if bit_depth != 8 or color_type not in PNG_COLOR_TYPES:
        kind = {3: "palette", 4: "grayscale+alpha", 6: "RGBA"}.get(color_type, f"colour type {color_type}")
        raise UserError(f"trigger {path} is a {bit_depth}-bit {kind} PNG: triggers must be 8-bit grayscale or RGB "
                        f"PNGs, as generate_samples.py writes them (re-export them, or verify with triggers.pt)")
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
        raise UserError(f"trigger {path} declares {width}x{height} pixels: larger than any model input here "
                        f"(at most {MAX_SIDE} a side), refused before decoding")
    return PNG_COLOR_TYPES[color_type], height, width


def read_png_folder(folder, expected_shape=None):
    """The folder's PNGs, in name order, as one uint8 (N, C, H, W) tensor. Every header is checked before any
    image is decoded: the same 8-bit shape for all, ``expected_shape`` (C, H, W) when given."""
    from torchvision.io import ImageReadMode, decode_png, read_file
    names = sorted(n for n in os.listdir(folder) if n.endswith(".png"))
    if not names:
        raise UserError(f"no PNG triggers in {folder}")
    if len(names) > MAX_TRIGGERS:
        raise UserError(f"{folder} holds {len(names)} PNGs, more than {MAX_TRIGGERS}: not a trigger set")
    paths = [os.path.join(folder, n) for n in names]
    shapes = [png_header(p) for p in paths]
    expected = tuple(expected_shape) if expected_shape else shapes[0]
    for path, shape in zip(paths, shapes):
        if shape != expected:
            raise UserError(f"trigger {path} is {shape[2]}x{shape[1]} with {shape[0]} channel(s), but the trigger set's "
                            f"images are {expected[2]}x{expected[1]} with {expected[0]}")
    try:
        images = [decode_png(read_file(p), ImageReadMode.UNCHANGED) for p in paths]
    except RuntimeError as e:
        raise UserError(f"cannot read PNG triggers in {folder}: {str(e).splitlines()[0]}") from None
    if any(image.dtype != torch.uint8 or tuple(image.shape) != expected for image in images):
        raise UserError(f"PNG triggers in {folder} did not decode to 8-bit images of shape {expected}")
    return torch.stack(images)


def check_trigger_meta(meta, where):
    """The trigger metadata as read from disk: a JSON object whose key file, if named, is a plain file name
    beside the trigger folder (never a path leading elsewhere)."""
    if not isinstance(meta, dict):
        raise UserError(f"trigger metadata in {where} is malformed: expected a JSON object")
    key_file = meta.get("key_file")
    if key_file is not None and (not isinstance(key_file, str) or key_file in ("", ".", "..")
                                 or os.path.basename(key_file) != key_file or "\\" in key_file):
        raise UserError(f"trigger metadata in {where} names key file {key_file!r}: only a file name beside the "
                        f"trigger folder is followed (pass --key to use another key)")
    shape = meta.get("input_shape")
    if shape is not None and not (isinstance(shape, list) and len(shape) == 3
                                  and all(isinstance(d, int) and 0 < d <= MAX_SIDE for d in shape)):
        raise UserError(f"trigger metadata in {where} has a malformed input_shape {shape!r}")
    return meta


def load_triggers(path):
    """(uint8 triggers, metadata) from a trigger folder (its PNGs), a PNG folder, or a triggers.pt file."""
    if os.path.isdir(path):
        folder = trigger_folder(path)
        png_dir = os.path.join(path, "png") if folder == path else path   # or the PNG folder itself was named
        meta_path = os.path.join(folder, "meta.json")
        meta = read_json(meta_path, "trigger metadata", expect=dict) if os.path.exists(meta_path) else {}
        check_trigger_meta(meta, meta_path)
        return read_png_folder(png_dir, meta.get("input_shape")), meta
    payload = safe_torch_load(path, "trigger file")
    if not isinstance(payload, dict) or payload.get("format") != TRIGGER_FORMAT:
        raise UserError(f"{path} is not a trigger file of this suite")
    images = payload.get("images")
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        raise UserError(f"{path}: triggers must be a uint8 tensor of shape (N, C, H, W)")
    if not 0 < len(images) <= MAX_TRIGGERS:
        raise UserError(f"{path} holds {len(images)} triggers: a trigger set needs 1 to {MAX_TRIGGERS}")
    return images, check_trigger_meta(payload.get("meta", {}), path)


def trigger_meta(model_meta, key_file, key_sha256, method, settings, extra):
    """The metadata of a trigger set: the weights it was made for, and the key it was made with (by name and by
    hash, so that a key and triggers from different runs are never paired)."""
    return {"weights_sha256": model_meta["weights_sha256"], "arch": model_meta["arch"],
            "dataset": model_meta["dataset"], "input_shape": model_meta["input_shape"],
            "key_file": os.path.basename(key_file), "key_sha256": key_sha256, "method": method, "settings": settings,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **versions(), **extra}
