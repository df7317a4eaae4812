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
from torch import Tensor, nn
from vector_quantize_pytorch import LFQ

import methods.lfq  # noqa: F401  (replaces the library's broken distributed mean of the batch entropy)

from methods.base import Quantizer, QuantizerOutput
from methods.registry import MethodError, register


def bits_of(codebook_size: int) -> int:
    """L = log2(K) for a power of two K >= 2, else a MethodError naming the nearest valid sizes."""
    if codebook_size < 2 or codebook_size & (codebook_size - 1):
        lower = 1 << max(codebook_size.bit_length() - 1, 1)
        raise MethodError(
            f"bsq needs a codebook size that is a power of two (its codes are all sign patterns of log2(K) bits), "
            f"got {codebook_size}; pass --codebook-size {lower} or {lower * 2}"
        )
    return codebook_size.bit_length() - 1


@register("bsq", palette_slot=14)
class BinarySphericalQuantizer(Quantizer):
    def __init__(
        self,
        dim: int,
        codebook_size: int,
        entropy_weight: float = 0.1,
        diversity_gamma: float = 1.0,
        commitment_weight: float = 0.0,
        inv_temperature: float = 1.0,
    ):
        super().__init__()
        self.bits = bits_of(codebook_size)
        self.dim, self.codebook_size = dim, codebook_size
        self.inv_temperature = inv_temperature
        self.lfq = LFQ(
            dim=dim,
            codebook_size=codebook_size,
            entropy_loss_weight=entropy_weight,
            commitment_loss_weight=commitment_weight * self.bits,  # the library's per-channel mean -> per-position sum
            diversity_gamma=diversity_gamma,
            straight_through_activation=nn.Identity(),
            num_codebooks=1,
            keep_num_codebooks_dim=False,
            codebook_scale=1.0,  # codes +-1, l2-normalized by spherical=True to +-1/sqrt(L)
            frac_per_sample_entropy=1.0,  # every position enters the per-sample entropy (below 1: a random subset)
            has_projections=True,  # the paper's linear projection to L channels, even when D == L
            projection_has_bias=True,
            soft_clamp_input_value=None,
            cosine_sim_project_in=False,
            cosine_sim_project_in_scale=None,
            channel_first=True,
            experimental_softplus_entropy_loss=False,
            entropy_loss_offset=5.0,  # only used by the softplus variant, which is off
            spherical=True,
            force_quantization_f32=True,
            orthogonal_rotation=False,
        )

    def sphere(self, z: Tensor) -> Tensor:
        """(B, D, H, W) -> (B, H, W, L): the projected encoder output on the unit sphere, before quantization."""
        return F.normalize(self.lfq.project_in(z.float().permute(0, 2, 3, 1)), dim=-1)

    def forward(self, z: Tensor) -> QuantizerOutput:
        with torch.autocast(z.device.type, enabled=False):
            (quantized, indices, aux), breakdown = self.lfq(
                z.float(), inv_temperature=self.inv_temperature, return_loss_breakdown=True
            )  # (B, D, H, W), (B, H, W) int32, scalar
            with torch.no_grad():
                v = self.sphere(z.detach())  # (B, H, W, L)
                q = torch.where(v > 0, 1.0, -1.0) / self.bits ** 0.5
                err = (v - q).pow(2).mean()
        diagnostics = {
            "per_sample_entropy": breakdown.per_sample_entropy.detach(),
            "batch_entropy": breakdown.batch_entropy.detach(),
        }
        return QuantizerOutput(quantized.to(z.dtype), indices.long(), aux, err, diagnostics)

    def decode_indices(self, indices: Tensor) -> Tensor:
        return self.lfq.indices_to_codes(indices)  # (B, H, W) -> (B, D, H, W)

    def export_codebook(self) -> Tensor:
        """The implicit codebook as the decoder sees it: (K, D), the codes +-1/sqrt(L) projected up."""
        return self.lfq.project_out(F.normalize(self.lfq.codebook, dim=-1)).detach()
