"""Device choice and the speed switches (TF32, cuDNN autotuning) that depend on it."""
import os
import random

import numpy as np
import torch

from .cli import UserError


def resolve_device(name):
    """'auto' picks CUDA when present; an unavailable device is a user error, not a crash."""
    if name in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available: use --device cpu")
    return device


def describe_device(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_fast_math(enabled):
    """TF32 matmuls/convolutions and cuDNN autotuning: fast, but not bit-exact, so verification turns them off."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    torch.backends.cudnn.benchmark = enabled
