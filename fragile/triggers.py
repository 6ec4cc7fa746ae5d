"""Secret keys and fragile triggers: generation, 8-bit export and storage.

Every trigger source produces real 8-bit images (uint8 tensors). They are stored twice, as a
tensor file and as one lossless PNG per trigger, and the key lives in its own JSON file.
"""
import json
import os
import secrets
import time

import torch
import torch.nn.functional as F

from .checkpoint_io import atomic_save_torch, atomic_write_json, safe_torch_load
from .cli import UserError
from .data import to_float
from .progress import progress_bar

TRIGGER_FORMAT = "fragile-wm-triggers/1"


# ----------------------------------------------------------------------------- keys

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


# ----------------------------------------------------------------------------- 8-bit images

def quantize(images):
    """Float images in [0, 1] -> uint8, rounding to the nearest of the 256 levels."""
    return images.detach().clamp(0, 1).mul(255).round().to(torch.uint8)


def straight_through_quantize(images):
    """Forward: the 8-bit image; backward: identity. Keeps optimisation on the pixel grid."""
    return images + (images.clamp(0, 1).mul(255).round().div(255) - images).detach()


@torch.no_grad()
def labels_and_margins(model, images_uint8, batch_size=1024):
    """Top-1 labels and top-1 minus runner-up logit margins of uint8 images, in fp32."""
    from .training import predict_logits
    logits = predict_logits(model, images_uint8, batch_size)
    top2 = logits.topk(2, dim=1).values
    return logits.argmax(1).cpu(), (top2[:, 0] - top2[:, 1]).cpu()


def margin_summary(margins):
    m = margins.double()
    return {"min": m.min().item(), "median": m.median().item(), "mean": m.mean().item(), "max": m.max().item()}


# ----------------------------------------------------------------------------- the paper's method

# The paper's code trains a 512-wide ProGAN generator with Adam lr 1e-4 (GPU: seconds; 2 CPU cores: ~20
# minutes). With Adam the step per weight is what lr sets, so a 64-wide generator needs a larger lr to move its
# images as fast: "fast" converges in ~100-250 steps on a CPU. Loss, lambda, betas and stopping rule are shared.
GENERATOR_RECIPES = {"paper": dict(GEN_CHANNELS=512, LR=1e-4), "fast": dict(GEN_CHANNELS=64, LR=3e-3)}


def paper_loss(logits, key, lam):
    """CE(f(G(z)), key) + lambda * var(softmax(f(G(z)))), the variance over every entry (no dim)."""
    return F.cross_entropy(logits, key) + lam * F.softmax(logits, dim=1).var()


def generate_paper(model, spec, key, cfg, device, log=print):
    """Train a randomly initialised ProGAN generator on a fixed latent batch against the frozen model.

    Stops once every 8-bit trigger carries its key label (checked each step on the quantized
    images, since the 8-bit images are what gets deployed). Returns (uint8 triggers, info).
    """
    from models import ProGANGenerator

    key_t = torch.tensor(key, device=device)
    latent_gen = torch.Generator().manual_seed(cfg["latent_seed"])
    z = torch.randn(len(key), cfg["latent_dim"], generator=latent_gen).to(device)
    torch.manual_seed(cfg["latent_seed"])
    generator = ProGANGenerator(spec.shape, cfg["latent_dim"], cfg["gen_channels"]).to(device)
    optimizer = torch.optim.Adam(generator.parameters(), lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]))
    model.eval().requires_grad_(False)
    matched = 0
    bar = progress_bar(range(1, cfg["max_steps"] + 1), desc="generator steps", enabled=cfg.get("progress", False))
    for step in bar:
        logits = model(generator(z))
        loss = paper_loss(logits, key_t, cfg["lam"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        float_matched = (logits.argmax(1) == key_t).sum().item()
        if float_matched >= len(key) - 2 or step % 25 == 0:  # the 8-bit check only when it can pass (or to log)
            with torch.no_grad():
                triggers = quantize(generator(z))
                matched = (model(to_float(triggers)).argmax(1) == key_t).sum().item()
            bar.set_postfix(loss=f"{loss.item():.4f}", on_key=f"{matched}/{len(key)}")
            if not cfg.get("progress"):  # without a bar, a log line says how far it got
                log(f"step {step}: loss {loss.item():.4f}, 8-bit triggers on key {matched}/{len(key)}")
            if matched == len(key):
                bar.close()
                log(f"generator: every 8-bit trigger on its key label after {step} steps")
                return triggers.cpu(), {"steps": step, "latents": z.cpu()}
    raise UserError(f"the generator did not put every 8-bit trigger on its key label within {cfg['max_steps']} "
                    f"steps ({matched}/{len(key)}): raise --max-steps or --lr")


# ----------------------------------------------------------------------------- storage

def default_paths(model_path, method):
    """Trigger folder and key file derived from the checkpoint path and the method."""
    stem = model_path[:-3] if model_path.endswith(".pt") else model_path
    return f"{stem}_triggers_{method}", f"{stem}_key_{method}.json"


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


def read_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{what} {path} is unreadable or not JSON: {e}") from None


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
        png_dir, folder = os.path.join(path, "png"), path
        if not os.path.isdir(png_dir):  # the PNG folder itself was named
            png_dir, folder = path, os.path.dirname(os.path.abspath(path))
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
    from .versions import collect
    return {"weights_sha256": model_meta["weights_sha256"], "arch": model_meta["arch"],
            "dataset": model_meta["dataset"], "input_shape": model_meta["input_shape"],
            "key_file": os.path.basename(key_file), "method": method, "settings": settings,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **collect(), **extra}
