"""The one learning-rate shape of the suite: linear warm-up, then cosine decay to a floor.

The harness's optimizer, VQGAN's discriminator, the stage-2 prior and MQ's outer optimizer all use it; it lives
in methods/ because methods may import nothing from bench/.
"""
from __future__ import annotations

import math


def warmup_cosine(step: float, warmup: float, total: float, floor: float = 0.0,
                  warmup_from_zero: bool = False) -> float:
    """The factor (in [floor, 1]) that multiplies the peak rate at step `step` (0-based) of `total`.

    Warm-up: (step + 1) / warmup, so the first step already moves; with warmup_from_zero, step / warmup (the MQ
    authors' outer schedule, whose first factor is 0). Then cosine from 1 at `warmup` to `floor` at `total`,
    and `floor` after it.
    """
    if step < warmup:
        return (step if warmup_from_zero else step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
