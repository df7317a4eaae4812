"""Factorized codes (Yu et al. 2022, "Vector-quantized Image Modeling with Improved VQGAN", ViT-VQGAN; as in the
LlamaGen tokenizer, Sun et al. 2024), the "VQGAN-FC" of the 2024-25 tokenizer papers.

`fc`: a linear map (per position: a 1x1 convolution) projects the encoder output from D channels down to a low
code dimension d (`code_dim`, default 8); the projected vector and every code are l2-normalized, the code is the
one of largest cosine similarity, and the straight-through estimator carries the gradient past the search; a
second linear map projects the unit-norm code back up to D for the decoder. The codebook is a parameter learned
by gradient, with the VQ-VAE loss in the normalized space:

    aux = codebook_weight * |sg(x) - c|^2 + commitment_weight * |x - sg(c)|^2,    x = P_in z / |P_in z|,
                                                                                   c = C_k / |C_k|

(means over positions and the d code channels; LlamaGen's weights 1 and 0.25). The codebook is initialized as
LlamaGen's: uniform in +-1/K, then l2-normalized (it is normalized again at every forward, so its norm is free).
Both projections carry a bias (LlamaGen's quant_conv and post_quant_conv).

quant_error: mean |x - c|^2 in the normalized d-dimensional space where the search happens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods.base import Quantizer, QuantizerOutput, from_rows, to_rows
from methods.registry import MethodError, register


@register("fc", palette_slot=13, search_space={"code_dim": (4, 8, 16), "commitment_weight": (0.1, 0.25, 1.0)})
class FactorizedVQ(Quantizer):
    def __init__(
        self,
        dim: int,
        codebook_size: int,
        code_dim: int = 8,
        codebook_weight: float = 1.0,
        commitment_weight: float = 0.25,
    ):
        super().__init__()
        if code_dim < 1:
            raise MethodError(f"fc: code_dim must be a positive integer (the low code dimension), got {code_dim}; "
                              f"pass code_dim=8")
        self.dim, self.codebook_size, self.code_dim = dim, codebook_size, code_dim
        self.codebook_weight, self.commitment_weight = codebook_weight, commitment_weight
        self.project_in = nn.Linear(dim, code_dim)  # D -> d, applied per position
        self.project_out = nn.Linear(code_dim, dim)  # d -> D
        self.codebook = nn.Embedding(codebook_size, code_dim)
        with torch.no_grad():
            nn.init.uniform_(self.codebook.weight, -1.0 / codebook_size, 1.0 / codebook_size)
            self.codebook.weight.copy_(F.normalize(self.codebook.weight, dim=1))

    def unit_codebook(self) -> Tensor:
        """(K, d): the codes on the unit sphere, as the search and the decoder use them."""
        return F.normalize(self.codebook.weight, dim=1)

    def forward(self, z: Tensor) -> QuantizerOutput:  # z: (B, D, H, W)
        projected = self.project_in(to_rows(z))  # (N, d), under the run's autocast like the encoder
        with torch.autocast(z.device.type, enabled=False):
            work = projected.float() if projected.dtype in (torch.float16, torch.bfloat16) else projected
            x = F.normalize(work, dim=1)  # (N, d)
            codes = self.unit_codebook().to(x.dtype)  # (K, d)
            idx = (x.detach() @ codes.detach().t()).argmax(1)  # (N,): largest cosine similarity
            chosen = codes.index_select(0, idx)  # (N, d)
            codebook_loss = (chosen - x.detach()).pow(2).mean()
            commitment_loss = (x - chosen.detach()).pow(2).mean()
            straight_through = x + (chosen - x).detach()  # (N, d)
        quantized = from_rows(self.project_out(straight_through), z.shape).to(z.dtype)  # (B, D, H, W)
        aux = self.codebook_weight * codebook_loss + self.commitment_weight * commitment_loss
        indices = idx.reshape(z.shape[0], z.shape[2], z.shape[3])  # (B, H, W)
        return QuantizerOutput(quantized, indices, aux, commitment_loss.detach())

    def decode_indices(self, indices: Tensor) -> Tensor:
        codes = self.unit_codebook()[indices]  # (B, H, W) -> (B, H, W, d)
        return self.project_out(codes).permute(0, 3, 1, 2)  # (B, D, H, W)

    def export_codebook(self) -> Tensor:
        """The codebook as the decoder sees it: (K, D), the unit codes projected up."""
        return self.project_out(self.unit_codebook()).detach()

    def export_note(self) -> dict:
        return {"code_dim": self.code_dim}
