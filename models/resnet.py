"""ResNets with the CIFAR stem (3x3 stride-1 conv, no max-pool), built from torchvision's blocks."""
import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock, ResNet


class Normalize(nn.Module):
    """The model's first layer: inputs are images in [0, 1], normalization happens inside the model."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def cifar_resnet(block, layers, in_channels, num_classes):
    """torchvision's ResNet with the CIFAR stem: a 3x3 stride-1 first conv and no max-pool."""
    net = ResNet(block, layers, num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


class ResNet8(nn.Module):
    """A tiny ResNet for tests and CPU runs: three stages of one basic block, widths 16/32/64."""

    def __init__(self, in_channels, num_classes, widths=(16, 32, 64)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages, channels = [], widths[0]
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or channels != width:
                down = nn.Sequential(nn.Conv2d(channels, width, 1, stride=stride, bias=False), nn.BatchNorm2d(width))
            stages.append(BasicBlock(channels, width, stride=stride, downsample=down))
            channels = width
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))
