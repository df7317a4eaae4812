"""Affine-reparameterized codebook (Huh et al. 2023, "Straightening Out the Straight-Through Estimator:
Overcoming Optimization Challenges in Vector Quantized Networks").

`affine`: the codes are c_k = s * c'_k + b, a learned table c' (K x D) under one learned per-channel scale s and
shift b (D each) shared by all codes. Every code then follows the encoder's statistics as soon as s and b move,
whether or not the code is ever chosen, which counters the codebook/encoder drift behind dead codes. Search,
straight-through estimator and losses are `ste`'s, on the reparameterized codes.

Learning-rate multiplier, as in the authors' vqtorch: s = 1 + m * s_raw and b = m * b_raw, with s_raw and b_raw
zero-initialized parameters of the one autoencoder optimizer. Adam-family optimizers (the harness's AdamW) take
steps of about lr per parameter whatever the gradient's scale, so s and b move m times faster than lr: an
honest lr multiplier without a second optimizer and its checkpoint state. (Under plain SGD the factor would be
m^2.) Default m = 10, the vqtorch README's example.

Synchronized update (their eq. 21), an option: the decoder input becomes z + sg(q - z) + nu * (q - sg(q)),
the same value, but the decoder's gradient also reaches the chosen codes with weight nu, so codes move with the
encoder. Default nu = 0 (off); the vqtorch README's example uses 0.2.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods.base import Quantizer, QuantizerOutput
from methods.registry import register
from methods.ste import straight_through_vq


@register("affine", palette_slot=11,
          search_space={"lr_multiplier": (1.0, 10.0, 100.0), "commitment_weight": (0.1, 0.25, 1.0)})
class AffineVQ(Quantizer):
    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_weight: float = 1.0,
        commitment_weight: float = 0.25,
        lr_multiplier: float = 10.0,
        sync_nu: float = 0.0,
    ):
        super().__init__()
        self.dim, self.codebook_size = dim, codebook_size
        self.codebook_weight, self.commitment_weight = codebook_weight, commitment_weight
        self.lr_multiplier, self.sync_nu = lr_multiplier, sync_nu
        self.base_codebook = nn.Parameter(torch.empty(codebook_size, dim).uniform_(-1.0 / codebook_size,
                                                                                   1.0 / codebook_size))
        self.scale_raw = nn.Parameter(torch.zeros(dim))
        self.shift_raw = nn.Parameter(torch.zeros(dim))

    @property
    def scale(self) -> Tensor:  # (D,)
        return 1.0 + self.lr_multiplier * self.scale_raw

    @property
    def shift(self) -> Tensor:  # (D,)
        return self.lr_multiplier * self.shift_raw

    def codebook(self) -> Tensor:
        """The codes the search and the decoder see: (K, D)."""
        return self.base_codebook * self.scale + self.shift

    def forward(self, z: Tensor) -> QuantizerOutput:
        codebook = self.codebook()
        quantized, indices, aux, err = straight_through_vq(
            z, codebook, self.codebook_weight, self.commitment_weight
        )
        if self.sync_nu > 0:
            chosen = self.decode_with(codebook, indices).to(quantized.dtype)  # (B, D, H, W)
            quantized = quantized + self.sync_nu * (chosen - chosen.detach())  # adds exactly zero to the value
        diagnostics = {"affine_scale_mean": self.scale.detach().mean(), "affine_shift_norm": self.shift.detach().norm()}
        return QuantizerOutput(quantized, indices, aux, err, diagnostics)

    @staticmethod
    def decode_with(codebook: Tensor, indices: Tensor) -> Tensor:
        return F.embedding(indices, codebook).permute(0, 3, 1, 2)  # (B, H, W) -> (B, D, H, W)

    def decode_indices(self, indices: Tensor) -> Tensor:
        return self.decode_with(self.codebook(), indices)

    def export_codebook(self) -> Tensor:
        return self.codebook().detach().clone()
