"""Straight-through vector quantization (van den Oord et al. 2017, "Neural Discrete Representation Learning").

`ste`:    nearest code by squared L2, straight-through gradient to the encoder,
          aux loss = codebook_weight * |sg(z) - e|^2 + commitment_weight * |z - sg(e)|^2.
`ste-ln`: the same, after the LayerNorm that MQ puts before its search (over the channels of the encoder's
          output, which the encoder's own 1x1 convolution has projected to the code dimension: the MQ authors'
          `quant_conv` then `trailing_norm`): the control that separates MQ's meta-objective from its
          normalization.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from methods.base import Quantizer, QuantizerOutput, from_rows, nearest_code, to_rows
from methods.registry import register


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of a (B, D, H, W) map.

    No projection of its own: every model's encoder ends in a 1x1 convolution to the code dimension (the MQ
    authors' `quant_conv`), and the authors put their LayerNorm right after it. (Before, a second 1x1 d -> d
    convolution sat here: the same function class, one linear layer more.)"""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, z: Tensor) -> Tensor:
        return self.norm(z.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def straight_through_vq(
    z: Tensor, codebook: Tensor, codebook_weight: float, commitment_weight: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Nearest-code quantization of z (B, D, H, W) with codebook (K, D).

    Returns (quantized with straight-through gradient, indices (B, H, W), aux loss, quantization error).
    The search and losses run in float32 when the input is half precision: argmin over bf16 distances flips
    codes. float64 stays float64 (the hypergradient tests run there).
    """
    work = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
    rows = to_rows(work)  # (N, D)
    with torch.autocast(z.device.type, enabled=False):
        codebook = codebook.to(work.dtype)
        idx = nearest_code(rows.detach(), codebook.detach())  # (N,)
        chosen = codebook.index_select(0, idx)  # (N, D); its backward is an index_add, 10x faster than codebook[idx]
        codebook_loss = (chosen - rows.detach()).pow(2).mean()
        commitment_loss = (rows - chosen.detach()).pow(2).mean()
    quantized_rows = rows + (chosen - rows).detach()
    quantized = from_rows(quantized_rows, z.shape).to(z.dtype)
    aux = codebook_weight * codebook_loss + commitment_weight * commitment_loss
    indices = idx.reshape(z.shape[0], z.shape[2], z.shape[3])
    return quantized, indices, aux, commitment_loss.detach()


class StraightThroughVQ(Quantizer):
    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_weight: float = 1.0,
        commitment_weight: float = 0.25,
        layernorm: bool = False,
    ):
        super().__init__()
        self.dim, self.codebook_size = dim, codebook_size
        self.codebook_weight, self.commitment_weight = codebook_weight, commitment_weight
        self.pre = ChannelLayerNorm(dim) if layernorm else nn.Identity()
        self.codebook = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    def forward(self, z: Tensor) -> QuantizerOutput:
        z = self.pre(z)
        quantized, indices, aux, err = straight_through_vq(
            z, self.codebook.weight, self.codebook_weight, self.commitment_weight
        )
        return QuantizerOutput(quantized, indices, aux, err)

    def decode_indices(self, indices: Tensor) -> Tensor:
        return self.codebook(indices).permute(0, 3, 1, 2)  # (B, H, W) -> (B, D, H, W)

    def export_codebook(self) -> Tensor:
        return self.codebook.weight.detach().clone()


@register("ste", palette_slot=0, reference=True,
          search_space={"commitment_weight": (0.1, 0.25, 1.0), "codebook_weight": (0.5, 1.0, 2.0)})
def ste(dim: int, codebook_size: int, codebook_weight: float = 1.0, commitment_weight: float = 0.25):
    return StraightThroughVQ(dim, codebook_size, codebook_weight, commitment_weight, layernorm=False)


@register("ste-ln", palette_slot=1, version=2,
          search_space={"commitment_weight": (0.1, 0.25, 1.0), "codebook_weight": (0.5, 1.0, 2.0)})  # 2: the authors' pre-search map
def ste_ln(dim: int, codebook_size: int, codebook_weight: float = 1.0, commitment_weight: float = 0.25):
    return StraightThroughVQ(dim, codebook_size, codebook_weight, commitment_weight, layernorm=True)
