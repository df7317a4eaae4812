"""The PatchGAN discriminator of pix2pix, as VQGAN uses it, and the hinge losses.

NLayer: a 4x4 stride-2 convolution with LeakyReLU(0.2), then `layers - 1` further stride-2 convolutions with
BatchNorm (channels doubling up to 8x), one stride-1 convolution with BatchNorm, and a stride-1 convolution to one
logit per patch. For a 256x256 input and 3 layers the logits are (B, 1, 30, 30), each seeing a 70x70 patch.

BatchNorm keeps no running statistics (as the MQ authors' copy): it always normalizes by the batch at hand, in
train and eval mode alike, so the generator's several calls per step (MQ evaluates the task loss more than once)
leave no trace in the discriminator's state.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from bench.models.init import initialize


class NLayerDiscriminator(nn.Module):
    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < layers else 1  # the last of these keeps the resolution
            # no bias: the BatchNorm right after has its own shift
            seq += [nn.Conv2d(channels * prev, channels * mult, 4, stride=stride, padding=1, bias=False),
                    nn.BatchNorm2d(channels * mult, track_running_stats=False), nn.LeakyReLU(0.2)]
        seq.append(nn.Conv2d(channels * mult, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*seq)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DCGAN init, as pix2pix, taming and the MQ authors use (bench/models/init.py's `normal-0.02`): conv
        weights N(0, 0.02), BatchNorm scale N(1, 0.02), shift 0; whatever the run's `init` option."""
        initialize([self], "normal-0.02")

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, H, W) in [-1, 1] -> (B, 1, h, w) patch logits
        return self.net(x)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """The discriminator's hinge loss: 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(G(x))))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """The generator's adversarial term: -mean D(G(x))."""
    return -logits_fake.mean()
