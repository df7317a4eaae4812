"""The ResNet VQ-VAE used across the VQ literature for CIFAR-10 and CelebA (van den Oord et al. 2017).

Encoder: log2(downsample) strided 4x4 convolutions, a 3x3 convolution, residual blocks, a 1x1 projection to
the code dimension. Decoder: the mirror image with transposed convolutions. Factor 4 turns 32x32 images into
8x8 latents; factor 8 turns 128x128 into 16x16.
"""
from __future__ import annotations

import math

from torch import Tensor, nn


class ResidualBlock(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(), nn.Conv2d(width, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, width, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class Encoder(nn.Module):
    def __init__(self, width: int, res_blocks: int, res_width: int, code_dim: int, downsample: int, channels: int = 3):
        super().__init__()
        n_down = int(math.log2(downsample))
        layers: list[nn.Module] = []
        in_ch = channels
        for i in range(n_down):
            out_ch = width // 2 if i < n_down - 1 else width
            layers += [nn.Conv2d(in_ch, out_ch, 4, stride=2, padding=1), nn.ReLU()]
            in_ch = out_ch
        layers.append(nn.Conv2d(width, width, 3, padding=1))
        layers += [ResidualBlock(width, res_width) for _ in range(res_blocks)]
        layers += [nn.ReLU(), nn.Conv2d(width, code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, D, H/f, W/f)
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self, width: int, res_blocks: int, res_width: int, code_dim: int, downsample: int, channels: int = 3):
        super().__init__()
        n_up = int(math.log2(downsample))
        layers: list[nn.Module] = [nn.Conv2d(code_dim, width, 3, padding=1)]
        layers += [ResidualBlock(width, res_width) for _ in range(res_blocks)]
        layers.append(nn.ReLU())
        in_ch = width
        for i in range(n_up):
            last = i == n_up - 1
            out_ch = channels if last else width // 2
            layers.append(nn.ConvTranspose2d(in_ch, out_ch, 4, stride=2, padding=1))
            if not last:
                layers.append(nn.ReLU())
            in_ch = out_ch
        self.net = nn.Sequential(*layers)

    def forward(self, z_q: Tensor) -> Tensor:  # (B, D, h, w) -> (B, 3, h*f, w*f)
        return self.net(z_q)
