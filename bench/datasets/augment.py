"""Training-time augmentation: a random square crop and a horizontal flip, on training batches only.

Every draw is a function of (seed, stream, step, row of the global batch): the same seed and step give the same batch on
any device and any number of ranks, and a resumed run repeats exactly what an uninterrupted one would have seen.
Validation and test batches are never augmented.

`random_crop=(a, b)`: a square whose side is a uniform fraction in [a, b] of the image's shorter side, at a
uniform position, resized (bilinear, antialiased) back to the training size. Folder datasets take the crop when
they decode, from the image resized to the training size on its shorter side: `(1, 1)` is then exactly the
"resize, then random crop" of the MQ authors' FFHQ and ImageNet loaders (on a non-square image the position moves
along the longer side). In-memory datasets crop the stored square. `hflip`: each image mirrored with probability
one half.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Augmentation:
    random_crop: tuple[float, float] | None = None
    hflip: bool = False

    @property
    def active(self) -> bool:
        return self.random_crop is not None or self.hflip


@dataclass
class CropDraws:
    """Per-image draws for one batch, all in [0, 1): side fraction within the range, position, flip."""

    side: Tensor  # (N,) fraction of the shorter side
    x: Tensor  # (N,) where the crop starts, as a fraction of the free width
    y: Tensor  # (N,) likewise of the free height
    flip: Tensor  # (N,) bool

    def row(self, i: int) -> tuple[float, float, float, bool]:
        return float(self.side[i]), float(self.x[i]), float(self.y[i]), bool(self.flip[i])


def draws(augmentation: Augmentation, seed: int, stream: int, position: int, rows: int) -> CropDraws:
    """The draws of batch `position` of index stream `stream` for its `rows` images (the global batch); a stream
    of its own beside the IndexStream's permutations, so augmenting never changes which images a batch holds."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + stream * 7_919 + position * 104_729) ^ 0x5EED)
    uniform = torch.rand(4, rows, generator=generator, dtype=torch.float64)
    low, high = augmentation.random_crop or (1.0, 1.0)
    return CropDraws(side=low + (high - low) * uniform[0], x=uniform[1], y=uniform[2],
                     flip=(uniform[3] < 0.5) & augmentation.hflip)


def crop_box(width: int, height: int, side_fraction: float, x: float, y: float) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the square crop in a width x height image."""
    side = max(1, round(side_fraction * min(width, height)))
    left, top = round(x * (width - side)), round(y * (height - side))
    return left, top, left + side, top + side


def augment_batch(images: Tensor, d: CropDraws) -> Tensor:
    """uint8 (N, 3, S, S) on any device -> the augmented uint8 batch (crops resized back to S, flips)."""
    size = images.shape[-1]
    out = images.clone()
    for i in range(len(images)):
        side, x, y, flip = d.row(i)
        left, top, right, bottom = crop_box(size, size, side, x, y)
        if right - left != size:
            crop = images[i:i + 1, :, top:bottom, left:right].float()
            out[i] = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True,
                                   align_corners=False).round_().clamp_(0, 255).to(torch.uint8)[0]
        if flip:
            out[i] = out[i].flip(-1)
    return out
