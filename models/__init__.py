"""The model zoo: one registry from architecture name to constructor.

Every classifier takes images in [0, 1]: normalization is its first layer.
"""
import torch.nn as nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from .generator import ProGANGenerator
from .resnet import Normalize, ResNet8, cifar_resnet

ARCHS = {
    "resnet8": lambda c, k: ResNet8(c, k),
    "resnet18": lambda c, k: cifar_resnet(BasicBlock, [2, 2, 2, 2], c, k),
    "resnet34": lambda c, k: cifar_resnet(BasicBlock, [3, 4, 6, 3], c, k),
    "resnet50": lambda c, k: cifar_resnet(Bottleneck, [3, 4, 6, 3], c, k),
}


def build_classifier(arch, spec):
    """``arch`` for dataset ``spec``: Normalize(spec) followed by the network."""
    if arch not in ARCHS:  # callers check user input first; the model zoo knows nothing of the suite above it
        raise ValueError(f"unknown arch {arch!r}: choose one of {', '.join(ARCHS)}")
    return nn.Sequential(Normalize(spec.mean, spec.std), ARCHS[arch](spec.shape[0], spec.num_classes))


__all__ = ["ARCHS", "build_classifier", "ProGANGenerator", "Normalize"]
