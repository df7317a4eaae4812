"""Cosine-similarity vector quantization (l2-normalized codes and inputs; Yu et al. 2022, "Vector-quantized
Image Modeling with Improved VQGAN"), on vector-quantize-pytorch.

`cosine`: the encoder output and every code are l2-normalized over the channel dimension, the nearest code is
the one of largest cosine similarity, and the decoder sees the unit-norm code, with the straight-through
gradient. The codebook follows exponential moving averages (decay 0.99), renormalized after each update, with
the commitment loss commitment_weight * |z/|z| - sg(e)|^2: exactly `ema` plus the normalization, which makes
the pair a clean ablation. EMA rather than a learnable codebook is also forced: the library refuses a learnable
codebook with cosine similarity.

quant_error: mean |z/|z| - e|^2, on the unit sphere where the search happens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from methods.base import QuantizerOutput
from methods.ema import PLAIN_EMA_VQ, LibraryVQ
from methods.registry import register


@register("cosine", palette_slot=5, search_space={"decay": (0.9, 0.99, 0.999), "commitment_weight": (0.1, 0.25, 1.0)})
class CosineVQ(LibraryVQ):
    def __init__(self, dim: int, codebook_size: int, decay: float = 0.99, commitment_weight: float = 0.25):
        super().__init__(dim, codebook_size, **{**PLAIN_EMA_VQ, "decay": decay, "commitment_weight": commitment_weight,
                                                "use_cosine_sim": True})

    def forward(self, z: Tensor) -> QuantizerOutput:
        out = super().forward(z)
        with torch.no_grad():
            unit = F.normalize(z.detach().float(), dim=1, eps=1e-6)  # the library's l2norm
            out.quant_error = (out.quantized.detach().float() - unit).pow(2).mean()
        return out
