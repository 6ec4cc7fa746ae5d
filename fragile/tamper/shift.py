"""Fine-tuning on another distribution (BIVBench's "fine-tuning on another data set"), defined offline.

    eval.py --attack shift    ShiftParams: the paper's fine-tuning (ctx.finetune) on a transformed copy of the
                              fine-tuning images, with their own labels

BIVBench fine-tunes a CIFAR-10 model on STL-10 (configs/cifar10/attack_configs/ftstl10.yaml), a download this
suite cannot make offline. The other distribution here is the training images under one fixed transform, the
labels kept: ``invert`` (255 - pixel: the same shapes in another intensity statistics), ``rotate`` (a quarter turn:
the same textures in another geometry), ``blur`` (3x3 box blur: another frequency content). Clean accuracy is
measured on the original test images, so the record shows what the owner's users lose.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.data import Split
from .finetune import fine_tune_run


@dataclass(frozen=True)
class ShiftParams:
    epochs: int = 1               # fine-tuning epochs on the shifted images (0: no change)
    transform: str = "invert"     # invert | rotate | blur


def invert(images):
    return 255 - images


def rotate(images):
    return torch.rot90(images, 1, dims=(2, 3))


def blur(images):
    smoothed = F.avg_pool2d(images.float(), 3, stride=1, padding=1, count_include_pad=False)
    return smoothed.round().clamp(0, 255).to(torch.uint8)


TRANSFORMS = {"invert": invert, "rotate": rotate, "blur": blur}


def shifted(split, transform):
    """The split's images under ``transform`` (uint8 in, uint8 out), its labels kept."""
    return Split(TRANSFORMS[transform](split.images), split.labels)


def run_shift(ctx, p, seed):
    """Fine-tune a copy on the shifted training images, recording the watermark step by step."""
    model = ctx.fresh_copy()
    return fine_tune_run(ctx, model, seed, p.epochs, f"shift-{p.transform}", f"shift with {p.epochs} epochs",
                         data=shifted(ctx.train, p.transform))
