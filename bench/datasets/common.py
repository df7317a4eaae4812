"""What every loader shares: the splits it returns, where data lives, the held-out validation split, and the
errors that tell a user how to get the files."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from bench import UserError

VAL_SIZE = 5000
VAL_SEED = 20250710  # fixed for every run: the validation split must not depend on the run's seed


@dataclass
class ImageSplits:
    name: str
    train: Tensor  # uint8 (N, 3, H, W); for datasets streamed from disk an ImageFiles that indexes like one
    val: Tensor
    test: Tensor
    info: dict = field(default_factory=dict)  # identifies the source where its name cannot (hf: id, fingerprint)

    def to(self, device: torch.device) -> "ImageSplits":
        return ImageSplits(self.name, self.train.to(device), self.val.to(device), self.test.to(device), self.info)


def default_data_root() -> Path:
    return Path(os.environ.get("VQBENCH_DATA") or Path.home() / ".cache" / "vq-bench" / "data")


def data_root_or_default(data_root: Path | None) -> Path:
    return Path(data_root) if data_root else default_data_root()


def hold_out_validation(images: Tensor, seed: int = VAL_SEED) -> tuple[Tensor, Tensor]:
    """A fixed seeded min(5,000, N / 10) of a training set as the validation split -> (train, val)."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    val_size = min(VAL_SIZE, len(images) // 10)
    return images[order[val_size:]], images[order[:val_size]]


def missing_data(what: str, where: Path, holding: str) -> UserError:
    return UserError(f"{what} not found: {where}; pass --data-root DIR (a folder holding {holding}, or set "
                     f"VQBENCH_DATA) or --download to fetch it")


def unreadable_data(what: str, where: Path, error: Exception) -> UserError:
    return UserError(f"{what} files under {where} are unreadable ({error}); delete them and pass --download")


def torchvision_download(what: str, root: Path, fetch: Callable[[], object]) -> None:
    """Let torchvision fetch a dataset into `root`; offline machines fail at name resolution: say what to do."""
    try:
        fetch()
    except Exception as error:
        raise UserError(f"downloading {what} into {root} failed ({type(error).__name__}: {error}); copy its files "
                        f"there by hand and pass --data-root") from None
