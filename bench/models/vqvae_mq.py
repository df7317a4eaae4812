"""`vqvae-mq`: the MQ authors' VQ-VAE (t2ance/MQVAE, models/vqvae_encoder_decoder.py and the projections around
the quantizer in models/models_vq.py), for their CIFAR-10 and CelebA settings.

Encoder: Conv4x4 s2 (3 -> z/2) BN ReLU, Conv4x4 s2 (z/2 -> z) BN ReLU, [for f8 one more Conv4x4 s2 (z -> z) BN
ReLU], Conv3x3 (z -> z), `num_res_blocks` residual blocks, then their `quant_conv`, a 1x1 convolution z -> d.
Residual block: x + BN(Conv1x1(ReLU(BN(Conv3x3(ReLU(x)))))).
Decoder: their `post_quant_conv`, a 1x1 convolution d -> z, `num_res_blocks` residual blocks, ConvT3x3 s1 (z -> z),
[for f8 BN ReLU ConvT4x4 s2 (z -> z)], BN ReLU ConvT4x4 s2 (z -> z/2), BN ReLU ConvT4x4 s2 (z/2 -> 3).
z = z_channels (theirs 64), d the code dimension; downsampling factor 4 (32x32 -> 8x8) or 8 (128x128 ->
16x16), the RunSpec's `downsample`. Differences from the suite's `vqvae`: BatchNorm in the stem, the residual
blocks and the decoder head, z -> z residual blocks (no narrower hidden width), no ReLU before the projection
to d, and the 1x1 convolution d -> z at the decoder's entrance.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from bench import UserError
from bench.models import VQModel
from bench.models.init import initialize
from bench.options import build, option
from methods import Quantizer


@dataclass
class VQVAEMQOptions:
    """spec.model_options of `vqvae-mq`. Defaults: the authors' (z_channels 64, 6 residual blocks in the encoder
    and in the decoder); the downsampling factor is the RunSpec's `downsample` (4 or 8)."""

    z_channels: int = option(64, "channels of the encoder's and decoder's body (theirs 64); even", minimum=2)
    num_res_blocks: int = option(6, "residual blocks in the encoder and in the decoder (theirs 6)", minimum=1)
    init: Literal["default", "normal-0.02"] = option(
        "default", "normal-0.02: the MQ authors' weights_init (bench/models/init.py); default: PyTorch's")


class ResBlock(nn.Module):
    """x + BN(Conv1x1(ReLU(BN(Conv3x3(ReLU(x)))))), width kept."""

    def __init__(self, width: int):
        super().__init__()
        self.block = nn.Sequential(nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width),
                                   nn.ReLU(), nn.Conv2d(width, width, 1), nn.BatchNorm2d(width))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


def down(in_ch: int, out_ch: int) -> list[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, 4, stride=2, padding=1), nn.BatchNorm2d(out_ch), nn.ReLU()]


def up(in_ch: int, out_ch: int) -> list[nn.Module]:
    return [nn.BatchNorm2d(in_ch), nn.ReLU(), nn.ConvTranspose2d(in_ch, out_ch, 4, stride=2, padding=1)]


class Encoder(nn.Module):
    def __init__(self, z_channels: int, res_blocks: int, code_dim: int, downsample: int, channels: int = 3):
        super().__init__()
        z = z_channels
        layers = [*down(channels, z // 2), *down(z // 2, z)]
        if downsample == 8:
            layers += down(z, z)
        layers.append(nn.Conv2d(z, z, 3, padding=1))
        layers += [ResBlock(z) for _ in range(res_blocks)]
        layers.append(nn.Conv2d(z, code_dim, 1))  # the authors' quant_conv
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, d, H/f, W/f)
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self, z_channels: int, res_blocks: int, code_dim: int, downsample: int, channels: int = 3):
        super().__init__()
        z = z_channels
        layers: list[nn.Module] = [nn.Conv2d(code_dim, z, 1)]  # the authors' post_quant_conv
        layers += [ResBlock(z) for _ in range(res_blocks)]
        layers.append(nn.ConvTranspose2d(z, z, 3, stride=1, padding=1))
        if downsample == 8:
            layers += up(z, z)
        layers += [*up(z, z // 2), *up(z // 2, channels)]
        self.net = nn.Sequential(*layers)

    def forward(self, z_q: Tensor) -> Tensor:  # (B, d, h, w) -> (B, 3, h*f, w*f)
        return self.net(z_q)


def build_vqvae_mq(spec, quantizer: Quantizer) -> VQModel:
    o = build(VQVAEMQOptions, spec.model_options, "vqvae-mq model option(s)", prefix="vqvae-mq option ")
    if spec.downsample not in (4, 8):
        raise UserError(f"vqvae-mq downsamples by 4 or 8 (the authors' CIFAR-10 and CelebA factors), "
                        f"got --downsample {spec.downsample}")
    if o.z_channels % 2:
        raise UserError(f"vqvae-mq option z_channels must be even (the stem has z_channels / 2), got {o.z_channels}")
    args = dict(z_channels=o.z_channels, res_blocks=o.num_res_blocks, code_dim=spec.code_dim,
                downsample=spec.downsample)
    encoder, decoder = Encoder(**args), Decoder(**args)
    initialize([encoder, decoder], o.init)
    return VQModel(encoder, quantizer, decoder, spec.recon_loss)
