"""Binary spherical quantization (Zhao, Xiong and Krähenbühl 2024, "Image and Video Tokenization with Binary
Spherical Quantization"), on vector-quantize-pytorch's LFQ with spherical=True.

`bsq`: a linear projection (by the library, dim=D) maps the encoder output to L = log2(K) channels, u; it is
l2-normalized, v = u / |u|, and each coordinate is quantized to its sign scaled onto the sphere,
q = sign(v) / sqrt(L), with the straight-through gradient; a linear projection maps q back to D. The bits read
as a binary number are the code index, so K must be a power of two. The implicit codebook is {+-1/sqrt(L)}^L.
The aux loss is the paper's entropy term plus an optional commitment term:

    aux = entropy_weight * (E[H(p(c|v))] - diversity_gamma * H(E[p(c|v)]))
          + commitment_weight * mean over positions of |v - sg(q)|^2 (summed over the L channels),
    p(c|v) = softmax over the 2^L codes c of 2 * inv_temperature * <v, c>

(per-sample entropy minimized, codebook (batch) entropy maximized). Defaults are the authors' code
(zhaoyue-zephyrus/bsq-vit): inv_temperature 1, gamma0 = gamma = zeta = 1, beta (commitment) 0, and the whole
quantizer loss weighted 0.1 in the task loss (`codebook_weight: 0.1`), so entropy_weight = 0.1 * zeta * gamma0 /
inv_temperature = 0.1 and diversity_gamma = gamma / gamma0 = 1. Their warm-up multiplier of that weight (3x,
ramped down over the first 2,000 steps) is not reproduced.

Why the library: its spherical LFQ is this definition. The projection, the normalization, the quantization to
+-1/sqrt(L) (its codebook_scale 1, l2-normalized), the straight-through estimator and the index are BSQ's, and
its entropy term is softmax(-inv_temperature * distance) with distance = -2 <v, c> over ALL 2^L codes: the
exact per-sample and codebook entropies, with the same 2x scale of the logits as the authors' code. The
authors compute the entropies over groups of 9 bits (a sum of group entropies: the paper's factorized
approximation, which is exact within a group), so for K <= 512 (L <= 9: one group) the library's entropy is
theirs exactly. For K > 512 the library is exact where the authors approximate (their codebook entropy is an
upper bound of the exact one), and it holds an N x K probability matrix (memory linear in K). Two details the
adapter sets explicitly: the projection is always present (has_projections=True: the paper's quant_embed, even
when D = L), and the library's commitment term is a per-channel mean, so it is weighted by
commitment_weight * L to give the authors' per-position sum.

quant_error: mean |v - q|^2 over the L channels of the normalized projection, where the "search" happens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from methods.base import Quantizer
from methods.lfq import LookupFreeQuantizer, bits_for
from methods.registry import register


@register("bsq", palette_slot=14,
          search_space={"entropy_weight": (0.01, 0.1, 0.5), "inv_temperature": (0.5, 1.0, 2.0)})
class BinarySphericalQuantizer(LookupFreeQuantizer):
    spherical = True

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        entropy_weight: float = 0.1,
        diversity_gamma: float = 1.0,
        commitment_weight: float = 0.0,
        inv_temperature: float = 1.0,
    ):
        Quantizer.__init__(self)
        self.bits = bits_for(codebook_size, "bsq")
        # the library's commitment term is a per-channel mean: times L, the authors' per-position sum; the projection
        # always present (the paper's quant_embed, even when D == L)
        self.build(dim, codebook_size, entropy_weight, commitment_weight * self.bits, diversity_gamma, inv_temperature,
                   project=True)

    def search_space(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(B, D, H, W) -> the projected input on the unit sphere (B, H, W, L), and its code +-1/sqrt(L)."""
        v = self.sphere(z)
        return v, torch.where(v > 0, 1.0, -1.0) / self.bits ** 0.5

    def sphere(self, z: Tensor) -> Tensor:
        """(B, D, H, W) -> (B, H, W, L): the projected encoder output on the unit sphere, before quantization."""
        return F.normalize(self.lfq.project_in(z.float().permute(0, 2, 3, 1)), dim=-1)

    def export_codebook(self) -> Tensor:
        """The implicit codebook as the decoder sees it: (K, D), the codes +-1/sqrt(L) projected up."""
        return self.lfq.project_out(F.normalize(self.lfq.codebook, dim=-1)).detach()
