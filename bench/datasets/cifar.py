"""`cifar10`: the real CIFAR-10 python format (`<root>/cifar-10-batches-py/`), read from its pickles.

The validation split is a fixed seeded 5,000 of the 50,000 training images, the test split is `test_batch`.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from bench import UserError
from bench.datasets.common import ImageSplits, data_root_or_default, hold_out_validation, unreadable_data

CIFAR_DIR = "cifar-10-batches-py"
CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


def read_cifar_batch(path: Path) -> np.ndarray:
    """One pickled CIFAR-10 batch -> (N, 3, 32, 32) uint8 (its `data` rows are 1024 R, 1024 G, 1024 B values)."""
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    data = batch[b"data"] if b"data" in batch else batch["data"]
    return np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32)


def load_cifar10(data_root: Path | None = None, download: bool = False) -> ImageSplits:
    root = data_root_or_default(data_root)
    folder = root / CIFAR_DIR
    if download and not folder.exists():
        from torchvision.datasets import CIFAR10

        try:
            CIFAR10(str(root), train=True, download=True)
        except Exception as error:  # offline machines fail at name resolution
            raise UserError(f"downloading CIFAR-10 into {root} failed ({error}); copy cifar-10-batches-py there "
                            f"by hand and pass --data-root") from None
    missing = [name for name in [*CIFAR_TRAIN, "test_batch"] if not (folder / name).exists()]
    if missing:
        raise UserError(
            f"CIFAR-10 not found: {folder} lacks {', '.join(missing)}; pass --data-root DIR (a folder holding "
            f"{CIFAR_DIR}/, or set VQBENCH_DATA) or --download to fetch it"
        )
    try:
        train = np.concatenate([read_cifar_batch(folder / name) for name in CIFAR_TRAIN])
        test = read_cifar_batch(folder / "test_batch")
    except Exception as error:
        raise unreadable_data("CIFAR-10", folder, error) from None
    train, val = hold_out_validation(torch.from_numpy(train))
    return ImageSplits("cifar10", train, val, torch.from_numpy(test))
