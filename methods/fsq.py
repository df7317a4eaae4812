"""Finite scalar quantization (Mentzer et al. 2024, "Finite Scalar Quantization: VQ-VAE Made Simple"), on
vector-quantize-pytorch's FSQ.

`fsq`: a linear projection (a 1x1 convolution on the feature map, done by the library with dim=D) maps the
encoder output to len(levels) channels; each channel is squashed by tanh and rounded to one of L_i levels with a
straight-through gradient, then projected back to D. There is no codebook to learn and no aux loss; the
implicit codebook is the grid of all level combinations, so the effective codebook size is prod(levels).

The levels come from the FSQ paper's table for its listed target sizes, which do not always hit K exactly:

    K       levels            prod(levels)
    2^8     8, 6, 5           240
    2^10    8, 5, 5, 5        1000
    2^12    7, 5, 5, 5, 5     4375
    2^14    8, 8, 8, 6, 5     15360
    2^16    8, 8, 8, 5, 5, 5  64000
    512     8, 8, 8           512     (not in the paper's table: our documented choice)

`codebook_size` of the adapter is prod(levels), so usage and perplexity are computed over the codes FSQ can
actually emit; `export_note()` states the levels. An explicit `levels=` option overrides the table; any other
K needs one. Levels of 2 are refused (the library then needs its symmetry-preserving variant, a different method).

quant_error: the mean squared rounding error in the bounded code space, |bound(z) - round(bound(z))|^2 with
every channel scaled to [-1, 1] (so at most (1 / (L_i // 2))^2 / 4 per channel).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from vector_quantize_pytorch import FSQ

from methods.base import Quantizer, QuantizerOutput, zero
from methods.registry import MethodError, register

PAPER_LEVELS: dict[int, tuple[int, ...]] = {
    2**8: (8, 6, 5),
    2**10: (8, 5, 5, 5),
    2**12: (7, 5, 5, 5, 5),
    2**14: (8, 8, 8, 6, 5),
    2**16: (8, 8, 8, 5, 5, 5),
    512: (8, 8, 8),
}


def resolve_levels(codebook_size: int, levels) -> tuple[int, ...]:
    """The explicit levels (a sequence of ints or a "8,5,5,5" string) if given, else the table's for K."""
    if levels is None:
        if codebook_size not in PAPER_LEVELS:
            listed = ", ".join(f"{k}: {list(v)}" for k, v in sorted(PAPER_LEVELS.items()))
            raise MethodError(
                f"fsq has no listed levels for codebook_size={codebook_size} (listed: {listed}); "
                f"pass the method option levels=[...] (e.g. --set fsq.levels=8,5,5,5 or in a preset), "
                f"or use a listed codebook size"
            )
        return PAPER_LEVELS[codebook_size]
    if isinstance(levels, str):
        levels = [part for part in levels.replace(" ", "").split(",") if part]
    try:
        levels = tuple(int(level) for level in levels)
    except (TypeError, ValueError):
        raise MethodError(f"fsq: levels must be a list of integers such as [8, 5, 5, 5], got {levels!r}") from None
    if not levels or any(level < 3 for level in levels):
        raise MethodError(f"fsq: every level must be an integer >= 3, got {list(levels)}; e.g. levels=[8, 5, 5, 5]")
    return levels


@register("fsq", palette_slot=8, search_space={"levels": ((8, 8, 8), (4, 4, 4, 8), (16, 8, 4))})
class FiniteScalarQuantizer(Quantizer):
    def __init__(self, dim: int, codebook_size: int, levels: tuple[int, ...] | None = None):
        super().__init__()
        self.levels = resolve_levels(codebook_size, levels)
        self.requested_codebook_size = codebook_size
        self.dim, self.codebook_size = dim, math.prod(self.levels)  # the effective K
        self.fsq = FSQ(
            levels=list(self.levels),
            dim=dim,  # projections D -> len(levels) -> D by the library, none when D == len(levels)
            num_codebooks=1,
            keep_num_codebooks_dim=False,
            scale=None,
            channel_first=True,
            projection_has_bias=True,
            return_indices=True,
            force_quantization_f32=True,
            preserve_symmetry=False,  # the paper's rounding; its bound is what unrounded_codes() mirrors
            noise_dropout=0.0,
            bound_hard_clamp=False,
            orthogonal_rotation=False,
        )

    def project(self, z: Tensor) -> Tensor:
        """(B, D, H, W) -> (B, H, W, d): the encoder output in the code space, before bounding."""
        return self.fsq.project_in(z.float().permute(0, 2, 3, 1))

    def unrounded_codes(self, projected: Tensor) -> Tensor:
        """(..., d) -> (..., d): the projected input squashed to the code range [-1, 1], before rounding.

        The library's FSQ.bound with its default eps and preserve_symmetry=False, without the final rounding
        (a test checks that rounding this gives the library's codes): tanh squashes each channel into
        (-(L-1)/2, (L-1)/2), shifted by half a level for even L, then it is scaled by 1 / (L // 2).
        """
        levels = self.fsq._levels
        half_l = (levels - 1) * (1 + 1e-3) / 2
        offset = torch.where(levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_l)
        return (torch.tanh(projected + shift) * half_l - offset) / (levels // 2)

    def forward(self, z: Tensor) -> QuantizerOutput:
        with torch.autocast(z.device.type, enabled=False):
            quantized, indices = self.fsq(z.float())  # (B, D, H, W), (B, H, W) int32
            with torch.no_grad():
                projected = self.project(z.detach())  # (B, H, W, d)
                err = (self.unrounded_codes(projected) - self.fsq.quantize(projected)).pow(2).mean()
        return QuantizerOutput(quantized.to(z.dtype), indices.long(), zero(quantized), err)

    def decode_indices(self, indices: Tensor) -> Tensor:
        return self.fsq.indices_to_codes(indices)  # (B, H, W) -> (B, D, H, W)

    def export_codebook(self) -> Tensor:
        """The implicit codebook as the decoder sees it: (prod(levels), D)."""
        all_codes = torch.arange(self.codebook_size, device=self.fsq._levels.device).view(1, -1, 1)
        return self.decode_indices(all_codes).detach()[0, :, :, 0].t().contiguous()

    def export_note(self) -> dict:
        return {"levels": list(self.levels), "codebook_size": self.codebook_size,
                "requested_codebook_size": self.requested_codebook_size}
