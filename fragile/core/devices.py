"""Device choice, the speed switches (TF32, cuDNN autotuning) that depend on it, and the software and hardware
versions recorded with every checkpoint, trigger set and result."""
import contextlib
import os
import platform
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
    """TF32 matmuls/convolutions and cuDNN autotuning for a whole run (a script's FAST_MATH switch)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    torch.backends.cudnn.benchmark = enabled


@contextlib.contextmanager
def tf32(enabled):
    """TF32 on or off for a block, then the flags as they were. Verification runs in ``tf32(False)``: TF32
    rounds fp32 inputs to 10 mantissa bits, enough to move a trigger sitting near a boundary. cuDNN
    autotuning is left alone, so fine-tuning steps between measurements keep their tuned kernels."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def cpu_name():
    """The CPU's model name and the vector instructions torch's kernels use on it (AVX2, AVX512...): two machines
    that differ here may compute different weights from the same seed and thread count."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name} ({torch.backends.cpu.get_cpu_capability()})"


@contextlib.contextmanager
def cudnn_benchmark(enabled):
    """cuDNN autotuning on or off for a block (it may pick other convolution kernels, whose sums round
    differently), then as it was."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def versions(device=None):
    """torch, torchvision and Python versions and torch's thread count (what the determinism contract names:
    the same seed, threads, device and torch version give the same weights), and the device when given."""
    import torchvision
    info = {"torch_version": str(torch.__version__), "torchvision_version": str(torchvision.__version__),
            "python_version": platform.python_version(), "threads": torch.get_num_threads(), "cpu": cpu_name()}
    if device is not None:
        info["device"] = describe_device(torch.device(device))
    return info
