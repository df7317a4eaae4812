"""Lookup-free quantization (Yu et al. 2024, "Language Model Beats Diffusion: Tokenizer is Key to Visual
Generation", MAGVIT-v2), on vector-quantize-pytorch's LFQ.

`lfq`: a linear projection (by the library, dim=D) maps the encoder output to log2(K) channels; each channel is
quantized to its sign, -1 or +1, with a straight-through gradient, and the bits read as a binary number are the
code index. The implicit codebook is {-1, 1}^log2(K), so K must be a power of two. The aux loss is
entropy_loss_weight * (per-sample entropy - diversity_gamma * entropy of the batch-averaged code distribution),
both over a softmax of -distance * inv_temperature to all K codes, plus commitment_loss_weight * |x - sg(sign x)|^2.
Defaults: MAGVIT-v2's entropy weight 0.1 and the usual commitment weight 0.25. The entropy term is a
difference of entropies, so the aux loss is typically negative.

quant_error: mean |x - sign(x)|^2 in the projected log2(K)-dimensional code space, where the "search" happens.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from vector_quantize_pytorch import LFQ
from vector_quantize_pytorch import lookup_free_quantization as _lfq_module

from methods import collective
from methods.base import Quantizer, QuantizerOutput

# Data parallelism: the library's batch ("codebook") entropy is meant to use the mean distribution over all
# ranks, but its maybe_distributed_mean (vector-quantize-pytorch 1.32) discards the result of the out-of-place
# torch.distributed.nn all_reduce and returns the rank's own mean divided by the world size (a 2-rank run saw a
# batch entropy of 1.68 where one process has 3.42). Its LFQ (used by `lfq` and `bsq`) looks the function up in
# its module at each call: replaced by the correct differentiable mean over the ranks (a no-op in one process).
_lfq_module.maybe_distributed_mean = collective.differentiable_mean
from methods.registry import MethodError, register


def bits_for(codebook_size: int, method: str = "lfq") -> int:
    """L = log2(K) for a power of two K >= 2, else a MethodError naming the nearest valid sizes."""
    if codebook_size < 2 or codebook_size & (codebook_size - 1):
        lower = 1 << max(codebook_size.bit_length() - 1, 1)
        raise MethodError(
            f"{method} needs a codebook size that is a power of two (its codes are all sign patterns of log2(K) "
            f"bits), got {codebook_size}; pass --codebook-size {lower} or {lower * 2}"
        )
    return codebook_size.bit_length() - 1


@register("lfq", palette_slot=9,
          search_space={"entropy_loss_weight": (0.01, 0.1, 0.5), "commitment_loss_weight": (0.1, 0.25, 1.0)})
class LookupFreeQuantizer(Quantizer):
    spherical = False  # bsq: codes and inputs on the unit sphere

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        entropy_loss_weight: float = 0.1,
        commitment_loss_weight: float = 0.25,
        diversity_gamma: float = 1.0,
        inv_temperature: float = 100.0,
    ):
        super().__init__()
        self.bits = bits_for(codebook_size)
        self.build(dim, codebook_size, entropy_loss_weight, commitment_loss_weight, diversity_gamma, inv_temperature,
                   project=dim != self.bits)

    def build(self, dim: int, codebook_size: int, entropy_weight: float, commitment_weight: float,
              diversity_gamma: float, inv_temperature: float, project: bool) -> None:
        self.dim, self.codebook_size = dim, codebook_size
        self.inv_temperature = inv_temperature
        self.lfq = LFQ(
            dim=dim,
            codebook_size=codebook_size,
            entropy_loss_weight=entropy_weight,
            commitment_loss_weight=commitment_weight,
            diversity_gamma=diversity_gamma,
            straight_through_activation=nn.Identity(),
            num_codebooks=1,
            keep_num_codebooks_dim=False,
            codebook_scale=1.0,  # codes +-1 (l2-normalized to +-1/sqrt(L) when spherical)
            frac_per_sample_entropy=1.0,  # every position enters the per-sample entropy (below 1: a random subset)
            has_projections=project,
            projection_has_bias=True,
            soft_clamp_input_value=None,
            cosine_sim_project_in=False,
            cosine_sim_project_in_scale=None,
            channel_first=True,
            experimental_softplus_entropy_loss=False,
            entropy_loss_offset=5.0,  # only used by the softplus variant, which is off
            spherical=self.spherical,
            force_quantization_f32=True,
            orthogonal_rotation=False,
        )

    def search_space(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(B, D, H, W) -> the projected inputs (B, H, W, L) and their codes, where the "search" happens."""
        x = self.lfq.project_in(z.float().permute(0, 2, 3, 1))
        return x, torch.where(x > 0, 1.0, -1.0)

    def forward(self, z: Tensor) -> QuantizerOutput:
        with torch.autocast(z.device.type, enabled=False):
            (quantized, indices, aux), breakdown = self.lfq(
                z.float(), inv_temperature=self.inv_temperature, return_loss_breakdown=True
            )  # (B, D, H, W), (B, H, W) int32, scalar
            with torch.no_grad():
                x, codes = self.search_space(z.detach())
                err = (x - codes).pow(2).mean()
        diagnostics = {
            "per_sample_entropy": breakdown.per_sample_entropy.detach(),
            "batch_entropy": breakdown.batch_entropy.detach(),
        }
        return QuantizerOutput(quantized.to(z.dtype), indices.long(), aux, err, diagnostics)

    def decode_indices(self, indices: Tensor) -> Tensor:
        return self.lfq.indices_to_codes(indices)  # (B, H, W) -> (B, D, H, W)

    def export_codebook(self) -> Tensor:
        """The implicit codebook as the decoder sees it: (K, D)."""
        return self.lfq.project_out(self.lfq.codebook).detach()
