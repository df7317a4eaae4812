"""Clustered VQ (Zheng & Vedaldi 2023, "Online Clustered Codebook", CVQ-VAE), native.

`cvq`: `ste` (nearest code by squared L2, straight-through estimator, codebook + commitment losses) plus two
codebook interventions that act on the codes' values directly, under no_grad:

- k-means initialization: on the first training batch the codebook is set to k-means centroids of the encoder
  outputs (the pinned library's `kmeans`, kmeans_iters Lloyd steps, initial centroids drawn from the batch by
  the global RNG). A buffer records that it happened, so a restored checkpoint is not re-initialized.
- re-anchoring: a running average of each code's share of positions, usage_k <- d * usage_k + (1 - d) * n_k / N,
  decides how far each code is pulled onto an anchor drawn from the current batch's encoder outputs:
  c_k <- (1 - a_k) c_k + a_k * anchor_k. By default (dead_threshold=None) a_k = exp(-10 K usage_k / (1 - d) - 1e-3),
  the authors' rule: rarely used codes are replaced, well used ones are untouched. With dead_threshold=t the
  rule is hard: a_k = 1 where K * usage_k / (1 - d^n) < t after n steps (the bias-corrected share below t times
  the uniform share 1/K, e.g. t = 0.03), else 0. Without the correction every code would count as dead at first.
  anchor="closest" (the authors' default) takes for each code the batch feature nearest to it; "random" a
  uniformly drawn batch feature (the authors draw from a feature pool across batches instead).

Native rather than vector-quantize-pytorch's kmeans_init + threshold_ema_dead_code: the library replaces a dead
code outright by a random batch vector under a hard threshold on an EMA of counts, not the authors' usage-weighted
pull towards the closest feature, and its dead-code check synchronizes with the host at every step. This adapter
never reads a device value during training except once, for the k-means flag, at the first training forward.
Choices within the authors' code's options: the search is by squared L2 (their code offers L2 or cosine
similarity), so that `cvq` differs from `ste` only by the two interventions; their optional contrastive loss is
not included; k-means initialization is ours (the brief's), their code starts from a uniform table.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from vector_quantize_pytorch.vector_quantize_pytorch import kmeans

from methods import collective
from methods.base import Quantizer, QuantizerOutput, to_rows
from methods.registry import MethodError, register
from methods.ste import straight_through_vq

ANCHORS = ("closest", "random")


@register("cvq", palette_slot=12,
          search_space={"usage_decay": (0.9, 0.99, 0.999), "commitment_weight": (0.1, 0.25, 1.0)})
class ClusteredVQ(Quantizer):
    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_weight: float = 1.0,
        commitment_weight: float = 0.25,
        usage_decay: float = 0.99,
        anchor: str = "closest",
        dead_threshold: float | None = None,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
    ):
        super().__init__()
        if anchor not in ANCHORS:
            raise MethodError(f"cvq: unknown anchor {anchor!r}; pass anchor= one of {', '.join(ANCHORS)}")
        if not 0.0 <= usage_decay < 1.0:
            raise MethodError(f"cvq: usage_decay must lie in [0, 1), got {usage_decay}; e.g. usage_decay=0.99")
        self.dim, self.codebook_size = dim, codebook_size
        self.codebook_weight, self.commitment_weight = codebook_weight, commitment_weight
        self.usage_decay, self.anchor, self.dead_threshold = usage_decay, anchor, dead_threshold
        self.kmeans_iters = kmeans_iters
        self.codebook = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        self.register_buffer("usage", torch.zeros(codebook_size))  # running share of positions per code
        self.register_buffer("usage_weight", torch.zeros(()))  # 1 - d^n after n updates, for the hard rule
        self.register_buffer("initialized", torch.tensor(not kmeans_init))
        self._initialized_seen = False  # a host-side copy of `initialized`, read from the device at most once

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._initialized_seen = False  # the loaded flag may differ

    # --- the two interventions ---------------------------------------------------------------------------------

    @torch.no_grad()
    def kmeans_init_(self, rows: Tensor) -> None:
        """rows: (N, D) encoder outputs of one batch -> codebook = k-means centroids, once per run."""
        if self._initialized_seen:
            return
        if not bool(self.initialized):  # the one host read of a device value
            means, _ = kmeans(rows[None], self.codebook_size, self.kmeans_iters)  # (1, K, D)
            self.codebook.weight.copy_(means[0])
            self.initialized.fill_(True)
        self._initialized_seen = True

    @torch.no_grad()
    def reanchor_(self, rows: Tensor, idx: Tensor) -> Tensor:
        """rows: (N, D), idx: (N,) their codes. Updates usage and pulls codes onto anchors; returns how many
        codes moved more than halfway (a diagnostic, a device scalar)."""
        k = self.codebook_size
        counts = torch.zeros(k, device=rows.device).index_add_(0, idx, torch.ones_like(idx, dtype=torch.float))
        self.usage.mul_(self.usage_decay).add_(counts / idx.numel(), alpha=1.0 - self.usage_decay)
        self.usage_weight.mul_(self.usage_decay).add_(1.0 - self.usage_decay)
        if self.dead_threshold is None:
            alpha = torch.exp(-10.0 * k * self.usage / (1.0 - self.usage_decay) - 1e-3)  # (K,)
        else:
            alpha = (k * self.usage / self.usage_weight < self.dead_threshold).float()
        codebook = self.codebook.weight  # (K, D), the parameter itself: updated in place
        codebook.lerp_(self.anchors(rows, codebook), alpha[:, None])
        return (alpha > 0.5).sum()

    def anchors(self, rows: Tensor, codebook: Tensor) -> Tensor:
        """(N, D), (K, D) -> (K, D): one batch feature per code."""
        if self.anchor == "random":
            return rows[torch.randint(rows.shape[0], (self.codebook_size,), device=rows.device)]
        # the full squared distance: |x|^2 decides which row is nearest to a given code
        distances = rows.pow(2).sum(1, keepdim=True) - 2 * rows @ codebook.t() + codebook.pow(2).sum(1)  # (N, K)
        return rows[distances.argmin(0)]

    # --- the contract ------------------------------------------------------------------------------------------

    def forward(self, z: Tensor) -> QuantizerOutput:
        if self.training:
            # under data parallelism both interventions see the global batch's rows (gathered, in the one-process
            # order) and draw from the global RNG, identical on every rank: every rank makes the same change
            rows = collective.all_gather_rows(to_rows(z.detach().float()))  # (global N, D)
            self.kmeans_init_(rows)
        quantized, indices, aux, err = straight_through_vq(
            z, self.codebook.weight, self.codebook_weight, self.commitment_weight
        )
        diagnostics = {}
        if self.training:
            # after the search and losses: the in-place change reaches the next batch, and autograd saved only
            # indices of the codebook, not its values
            moved = self.reanchor_(rows, collective.all_gather_rows(indices.reshape(-1)))
            diagnostics["reanchored_codes"] = moved
        return QuantizerOutput(quantized, indices, aux, err, diagnostics)

    def decode_indices(self, indices: Tensor) -> Tensor:
        return self.codebook(indices).permute(0, 3, 1, 2)  # (B, H, W) -> (B, D, H, W)

    def export_codebook(self) -> Tensor:
        return self.codebook.weight.detach().clone()
