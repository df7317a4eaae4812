"""SimVQ (Zhu et al. 2024, "Addressing Representation Collapse in Vector Quantized Models with One Linear
Layer"), on vector-quantize-pytorch's SimVQ.

`simvq`: the codebook is C = Q W, a frozen random Gaussian table Q (K x D, entries N(0, 1/D), a buffer drawn
from the global RNG at construction) times one learned linear map W (D x D, no bias). Nearest code by L2 to C,
straight-through gradient to the encoder, and the VQ-VAE loss codebook_weight * |sg(z) - c|^2 +
commitment_weight * |z - sg(c)|^2: the codebook term trains W, so one update moves every code at once.

The library multiplies both terms by its `commitment_weight` and the second again by
`input_to_quantize_commit_loss_weight`; the adapter maps our two weights onto those. Its rotation trick is on by
default in the library; the paper uses the plain straight-through estimator, so it is off here (an option).
"""
from __future__ import annotations

import torch
from torch import Tensor
from vector_quantize_pytorch import SimVQ

from methods.base import Quantizer, QuantizerOutput
from methods.registry import MethodError, register


def _keep(codebook: Tensor) -> Tensor:
    return codebook


@register("simvq", palette_slot=10,
          search_space={"commitment_weight": (0.1, 0.25, 1.0), "codebook_weight": (0.5, 1.0, 2.0)})
class SimVQAdapter(Quantizer):
    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_weight: float = 1.0,
        commitment_weight: float = 0.25,
        rotation_trick: bool = False,
    ):
        super().__init__()
        if not codebook_weight > 0:
            raise MethodError(f"simvq: codebook_weight must be positive (it is what trains the linear map), got "
                              f"{codebook_weight}; pass codebook_weight=1.0")
        self.dim, self.codebook_size = dim, codebook_size
        self.sim = SimVQ(
            dim=dim,
            codebook_size=codebook_size,
            codebook_transform=None,  # the library's default: nn.Linear(D, D, bias=False)
            init_fn=_keep,  # Q stays the Gaussian draw
            channel_first=True,
            rotation_trick=rotation_trick,
            commitment_weight=codebook_weight,
            input_to_quantize_commit_loss_weight=commitment_weight / codebook_weight,
            frozen_codebook_dim=dim,
        )

    def forward(self, z: Tensor) -> QuantizerOutput:
        with torch.autocast(z.device.type, enabled=False):
            quantized, indices, aux = self.sim(z.float())  # (B, D, H, W), (B, H, W), scalar
            err = (quantized.detach() - z.detach().float()).pow(2).mean()
        return QuantizerOutput(quantized.to(z.dtype), indices, aux, err)

    def decode_indices(self, indices: Tensor) -> Tensor:
        return self.sim.indices_to_codes(indices)  # (B, H, W) -> (B, D, H, W)

    def export_codebook(self) -> Tensor:
        return self.sim.codebook.detach().clone()  # Q W, (K, D)
