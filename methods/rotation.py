"""The rotation trick (Fifty et al. 2024, "Restructuring Vector Quantization with the Rotation Trick"), on
vector-quantize-pytorch.

`rotation`: nearest code by squared L2, as in `ste`, but the gradient reaches the encoder through a rotation
and rescaling that maps the encoder output e onto its code q (treated as constants), instead of being copied
unchanged: the decoder sees exactly q, and the encoder receives R^T g * |q| / |e| for the decoder gradient g.

The codebook is learned by gradient, as in the paper, which keeps VQ-VAE's codebook and commitment terms:
learnable_codebook=True, ema_update=False, and the aux loss
codebook_weight * |sg(e) - q|^2 + commitment_weight * |e - sg(q)|^2, computed here, not by the library. The
library's own term with learnable_codebook=True is commitment_weight * |e - q|^2 with one weight for both
directions, so its commitment_weight is 0 and the two terms are ours. The rotated output carries no gradient
to the codebook (every codebook factor in it is detached), so the codebook moves only by its codebook term.
The codebook is initialized as `ste`'s (uniform in +-1/K), so that `rotation` and `ste` differ only in the
gradient estimator.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from methods.base import QuantizerOutput, to_rows
from methods.ema import PLAIN_EMA_VQ, LibraryVQ
from methods.registry import register


@register("rotation", palette_slot=3,
          search_space={"commitment_weight": (0.1, 0.25, 1.0), "codebook_weight": (0.5, 1.0, 2.0)})
class RotationVQ(LibraryVQ):
    def __init__(self, dim: int, codebook_size: int, codebook_weight: float = 1.0, commitment_weight: float = 0.25):
        super().__init__(dim, codebook_size, **{
            **PLAIN_EMA_VQ,
            "commitment_weight": 0.0,  # the library's one-weight term is replaced by ours, see the module docstring
            "ema_update": False,  # the codebook learns by its gradient (decay is then unused)
            "learnable_codebook": True,
            "rotation_trick": True,
        })
        self.codebook_weight, self.commitment_weight = codebook_weight, commitment_weight
        with torch.no_grad():
            nn.init.uniform_(self.vq._codebook.embed, -1.0 / codebook_size, 1.0 / codebook_size)

    def forward(self, z: Tensor) -> QuantizerOutput:
        out = super().forward(z)  # rotated output, indices; the library's aux is zero here
        with torch.autocast(z.device.type, enabled=False):
            rows = to_rows(z.float())  # (N, D)
            chosen = self.vq.codebook[out.indices.reshape(-1)]  # (N, D), differentiable w.r.t. the codebook
            codebook_loss = (chosen - rows.detach()).pow(2).mean()
            commitment_loss = (rows - chosen.detach()).pow(2).mean()
        out.aux_loss = out.aux_loss + self.codebook_weight * codebook_loss + self.commitment_weight * commitment_loss
        return out
