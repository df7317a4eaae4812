"""Weight initialization schemes, chosen per run by the model option `init` (the same for every method).

`default`:     PyTorch's own initialization of every layer.
`normal-0.02`: the MQ authors' `weights_init` (DCGAN's, also taming's and pix2pix's for the discriminator):
               every convolution weight, transposed ones included, ~ N(0, 0.02), its bias left at PyTorch's
               default; every BatchNorm weight ~ N(1, 0.02), its bias 0. Other layers (GroupNorm, LayerNorm,
               Linear) keep PyTorch's initialization.

It applies to the encoder and decoder (the authors apply it to their whole generator, whose convolutions are the
encoder's, the decoder's and the 1x1 projections around the quantizer, which the suite's encoders and decoders
hold). A quantizer's own layers keep its method's initialization. The PatchGAN discriminator is always
initialized this way (bench/models/discriminator.py), as taming's and the authors' are.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

INITS = ("default", "normal-0.02")


@torch.no_grad()
def initialize(modules: Iterable[nn.Module], scheme: str) -> None:
    """Re-initialize the layers of `modules` in place by `scheme` (one of INITS), in module order, drawing from
    the global torch RNG."""
    if scheme not in INITS:
        raise ValueError(f"unknown init {scheme!r}; valid: {', '.join(INITS)}")
    if scheme == "default":
        return
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, nn.modules.conv._ConvNd):
                nn.init.normal_(layer.weight, 0.0, 0.02)
            elif isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.affine:
                nn.init.normal_(layer.weight, 1.0, 0.02)
                nn.init.zeros_(layer.bias)
