"""Residual vector quantization (Zeghidour et al. 2021, SoundStream; Lee et al. 2022, RQ-VAE), on
vector-quantize-pytorch's ResidualVQ: D = `depth` codes per latent position.

`rvq`: level 0 quantizes the encoder output z to its nearest code (squared L2) in codebook C_0; level i quantizes
the residual left by the levels before it, r_i = z - sum_{j<i} C_j[k_j], with its own codebook C_i of K codes.
The decoder sees the sum of the D chosen codes, with one straight-through estimator over the sum (the encoder
receives the decoder's gradient once). The indices are (B, H, W, D), level innermost (`code_depth` = D), each in
[0, K): the harness counts them per level and over all K * D codebook vectors, and the stage-2 prior reads them
as H * W * D tokens, depth innermost (as RQ-Transformer's order).

Every codebook follows exponential moving averages (decay 0.99, as `ema`, RQ-VAE and SoundStream), and the aux
loss is the commitment term only, averaged over the levels (RQ-VAE's form):

    aux = commitment_weight * (1/D) sum_i |r_i - sg(C_i[k_i])|^2,    commitment_weight = 0.25,

so `rvq` with depth=1 is `ema`. The library's behaviour flags, each named below: no k-means initialization and
no dead-code replacement (SoundStream uses both; left out so that rvq differs from `ema` only in depth), rotation
trick off, separate codebooks per level (shared_codebook=False), no quantizer dropout (SoundStream's bitrate
scalability: every level is always used), no beam search, no implicit neural codebook.

One deliberate difference from the library's output: ResidualVQ applies a straight-through estimator at every
level and detaches each level's code from the next residual, so each level's output carries the identity
gradient to z and the encoder would receive D times the decoder's gradient. The adapter re-applies one
straight-through estimator to the library's (identical) summed value, as RQ-VAE, SoundStream and EnCodec do.
The commitment terms and the EMA updates are the library's.

quant_error: mean |z - sum_i C_i[k_i]|^2, the error of the whole stack.
"""
from __future__ import annotations

import torch
from torch import Tensor
from vector_quantize_pytorch import ResidualVQ

from methods import collective
from methods.base import Quantizer, QuantizerOutput
from methods.ema import PLAIN_EMA_VQ
from methods.registry import MethodError, register


@register("rvq", palette_slot=16, search_space={"decay": (0.9, 0.99, 0.999), "commitment_weight": (0.1, 0.25, 1.0)})
class ResidualVQAdapter(Quantizer):
    def __init__(self, dim: int, codebook_size: int, depth: int = 4, decay: float = 0.99,
                 commitment_weight: float = 0.25):
        super().__init__()
        if depth < 1:
            raise MethodError(f"rvq: depth must be a positive integer (codes per position), got {depth}; pass depth=4")
        self.dim, self.codebook_size, self.code_depth = dim, codebook_size, depth
        self.rvq = ResidualVQ(
            dim=dim,
            num_quantizers=depth,
            codebook_size=codebook_size,  # K per level
            codebook_dim=None,  # the codes live in the encoder's D dimensions: no projection
            shared_codebook=False,
            diveq=False,
            heads=1,
            quantize_dropout=False,
            quantize_dropout_cutoff_index=0,
            quantize_dropout_multiple_of=1,
            accept_image_fmap=False,  # the adapter passes (B, H*W, D) rows
            implicit_neural_codebook=False,
            beam_size=None,
            eval_beam_size=None,
            quant_grad_frac=0.0,  # each level's code is detached from the next residual (see the docstring)
            return_zeros_for_masked_padding=True,  # only used with a mask, which the adapter never passes
            sync_codebook=collective.distributed(),  # every level's EMA statistics summed over the ranks
            **{**PLAIN_EMA_VQ, "decay": decay, "commitment_weight": commitment_weight},  # per level, EMA, no k-means
        )

    def forward(self, z: Tensor) -> QuantizerOutput:  # z: (B, D, H, W)
        b, d, h, w = z.shape
        with torch.autocast(z.device.type, enabled=False):
            work = z.float()
            rows = work.permute(0, 2, 3, 1).reshape(b, h * w, d)  # (B, H*W, D)
            summed, indices, losses = self.rvq(rows)  # (B, H*W, D), (B, H*W, depth), (depth,)
            summed = summed.reshape(b, h, w, d).permute(0, 3, 1, 2)  # (B, D, H, W)
            quantized = work + (summed - work).detach()  # one straight-through estimator over the sum
            err = (summed.detach() - work.detach()).pow(2).mean()
        aux = losses.sum() / self.code_depth  # the library weights each level's term by commitment_weight
        return QuantizerOutput(quantized.to(z.dtype), indices.reshape(b, h, w, self.code_depth), aux, err)

    def decode_indices(self, indices: Tensor) -> Tensor:
        """(B, H, W, depth) -> (B, D, H, W): the sum of each level's chosen code."""
        return self.rvq.get_output_from_indices(indices).permute(0, 3, 1, 2)

    def export_codebook(self) -> Tensor:
        """(depth, K, D): level i's codebook in [i]."""
        return self.rvq.codebooks.detach().clone()

    def export_note(self) -> dict:
        return {"depth": self.code_depth}
