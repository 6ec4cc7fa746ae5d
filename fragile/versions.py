"""Software and hardware versions recorded with every checkpoint, trigger set and result."""
import platform

import torch


def collect(device=None):
    import torchvision
    info = {"torch_version": str(torch.__version__), "torchvision_version": str(torchvision.__version__),
            "python_version": platform.python_version()}
    if device is not None:
        from .devices import describe_device
        info["device"] = describe_device(torch.device(device))
    return info
