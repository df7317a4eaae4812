"""Seeded streams of batch indices into a split: the training loop draws a batch as `images[stream(position)]`."""
from __future__ import annotations

import torch
from torch import Tensor

from bench import UserError


class IndexStream:
    """Seeded batches of indices into a split: batch p is a slice of epoch p // per_epoch's permutation.

    A batch depends only on (seed, stream, position), so a stream resumes exactly from its position, and two
    methods with the same seed see the same batches. The last incomplete batch of an epoch is dropped.
    """

    def __init__(self, size: int, batch_size: int, seed: int, stream: int, device: torch.device | str = "cpu"):
        if batch_size > size:
            raise UserError(f"--batch-size {batch_size} is larger than the training split ({size} images)")
        self.size, self.batch_size, self.seed, self.stream = size, batch_size, seed, stream
        self.per_epoch = size // batch_size
        self.device = device
        self._epoch, self._order = -1, None

    def __call__(self, position: int) -> Tensor:
        epoch, slot = divmod(position, self.per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.stream * 7_919 + epoch)
            self._order = torch.randperm(self.size, generator=generator).to(self.device)
            self._epoch = epoch
        return self._order[slot * self.batch_size:(slot + 1) * self.batch_size]
