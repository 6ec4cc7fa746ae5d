"""Progressive-GAN-style generator (Karras et al. 2018), as in the paper's public code.

Equalized-learning-rate convolutions, pixel-wise feature normalization and LeakyReLU(0.2),
grown to the final stage before training (no progressive schedule: it is trained from a random
initialisation against a frozen classifier, not as a GAN). Outputs are squashed into [0, 1] and
have the dataset's exact (channels, height, width).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class EqualizedConv2d(nn.Module):
    """Weights drawn from N(0, 1) and scaled at run time by He's constant: every layer learns at one rate."""

    def __init__(self, in_channels, out_channels, kernel_size, padding=0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.scale = math.sqrt(2.0 / (in_channels * kernel_size * kernel_size))
        self.padding = padding

    def forward(self, x):
        return F.conv2d(x, self.weight * self.scale, self.bias, padding=self.padding)


class PixelNorm(nn.Module):
    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)


def _conv_block(in_channels, out_channels, kernel_size, padding):
    return [EqualizedConv2d(in_channels, out_channels, kernel_size, padding), nn.LeakyReLU(0.2), PixelNorm()]


def start_resolution(size):
    """Halve the output size while it stays even and above 4: 32 -> 4, 28 -> 7."""
    while size % 2 == 0 and size > 4:
        size //= 2
    return size


class ProGANGenerator(nn.Module):
    def __init__(self, image_shape, latent_dim=512, base_channels=128, min_channels=32):
        super().__init__()
        out_channels, height, width = image_shape
        if height != width:
            raise ValueError("the generator makes square images")
        self.latent_dim = latent_dim
        start = start_resolution(height)
        channels = base_channels
        # First stage: the latent vector as a 1x1 map, a start x start "transposed" conv, then a 3x3 conv.
        layers = [PixelNorm(), *_conv_block(latent_dim, channels * start * start, 1, 0)]
        self.stem = nn.Sequential(*layers)
        self.start, self.stem_channels = start, channels
        blocks = _conv_block(channels, channels, 3, 1)
        size = start
        while size < height:
            next_channels = max(min_channels, channels // 2)
            blocks += [nn.Upsample(scale_factor=2, mode="nearest"),
                       *_conv_block(channels, next_channels, 3, 1), *_conv_block(next_channels, next_channels, 3, 1)]
            channels, size = next_channels, size * 2
        self.body = nn.Sequential(*blocks)
        self.to_image = EqualizedConv2d(channels, out_channels, 1)

    def forward(self, z):
        x = self.stem(z.view(len(z), -1, 1, 1)).view(len(z), self.stem_channels, self.start, self.start)
        return torch.sigmoid(self.to_image(self.body(x)))
