"""EMA vector quantization (van den Oord et al. 2017, appendix; Razavi et al. 2019), on vector-quantize-pytorch.

The codebook is not trained by gradients: each code moves to an exponential moving average (decay 0.99) of
the encoder outputs assigned to it. The only aux loss is commitment_weight * |z - sg(e)|^2.
Every argument of the library that selects behaviour is named below, because its defaults (rotation trick
on, decay 0.8) are not the published method's and change between releases.
"""
from __future__ import annotations

import torch
from torch import Tensor
from vector_quantize_pytorch import VectorQuantize

from methods import collective
from methods.base import Quantizer, QuantizerOutput
from methods.registry import register


class LibraryVQ(Quantizer):
    """A vector-quantize-pytorch `VectorQuantize` behind the contract; subclasses choose its arguments."""

    def __init__(self, dim: int, codebook_size: int, **vq_arguments):
        super().__init__()
        self.dim, self.codebook_size = dim, codebook_size
        # the EMA statistics (cluster sizes, sums) summed over the ranks exactly when there are several: set
        # explicitly, never the library's auto-detection. Learnable codebooks (rotation) take no in-place
        # optimizer here, so the library never all-reduces their gradients: the harness's average is the only one.
        self.vq = VectorQuantize(dim=dim, codebook_size=codebook_size, accept_image_fmap=True,
                                 sync_codebook=collective.distributed(), **vq_arguments)

    def forward(self, z: Tensor) -> QuantizerOutput:
        with torch.autocast(z.device.type, enabled=False):
            quantized, indices, aux = self.vq(z.float())  # (B, D, H, W), (B, H, W), (1,)
            err = (quantized.detach() - z.detach().float()).pow(2).mean()
        return QuantizerOutput(quantized.to(z.dtype), indices, aux.sum(), err)

    def decode_indices(self, indices: Tensor) -> Tensor:
        return self.vq.get_output_from_indices(indices)  # (B, H, W) -> (B, D, H, W) with accept_image_fmap

    def export_codebook(self) -> Tensor:
        return self.vq.codebook.detach().clone()


# Every VectorQuantize argument that selects behaviour, at the values of plain EMA vector quantization. Adapters
# on the library start from these and change only what defines their method, so that no library default (they
# change between releases) decides anything.
PLAIN_EMA_VQ = dict(
    decay=0.99,
    commitment_weight=0.25,
    ema_update=True,
    learnable_codebook=False,
    rotation_trick=False,
    straight_through=False,
    directional_reparam=False,
    use_cosine_sim=False,
    kmeans_init=False,
    threshold_ema_dead_code=0,
    stochastic_sample_codes=False,
    orthogonal_reg_weight=0.0,
    codebook_diversity_loss_weight=0.0,
    affine_param=False,
    sync_update_v=0.0,
    commitment_use_cross_entropy_loss=False,
    manual_ema_update=False,
    freeze_codebook=False,
    route_gradients_to_input=True,
    eps=1e-5,
)


@register("ema", palette_slot=2, search_space={"decay": (0.9, 0.99, 0.999), "commitment_weight": (0.1, 0.25, 1.0)})
class EMAVQ(LibraryVQ):
    def __init__(self, dim: int, codebook_size: int, decay: float = 0.99, commitment_weight: float = 0.25):
        super().__init__(dim, codebook_size, **{**PLAIN_EMA_VQ, "decay": decay, "commitment_weight": commitment_weight})
