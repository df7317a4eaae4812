"""`svhn`: the cropped-digits .mat files (train_32x32.mat, test_32x32.mat), read with scipy.

X is (32, 32, 3, N) uint8; the labels y are not needed. `extra` is not used. Validation: a fixed seeded 5,000 of
the 73,257 training images.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bench.datasets.common import (ImageSplits, data_root_or_default, hold_out_validation, missing_data,
                                   torchvision_download, unreadable_data)

SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}


def read_svhn(path: Path) -> Tensor:
    from scipy.io import loadmat

    x = loadmat(str(path), variable_names=["X"])["X"]  # (32, 32, 3, N)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise ValueError(f"X has shape {x.shape}, expected (32, 32, 3, N)")
    return torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1)).astype(np.uint8, copy=False))


def load_svhn(data_root: Path | None = None, download: bool = False) -> ImageSplits:
    root = data_root_or_default(data_root)
    # torchvision's SVHN keeps the files directly in the root it is given; we give it <root>/svhn
    folder = next((f for f in (root / "svhn", root) if all((f / n).is_file() for n in SVHN_FILES.values())), None)
    if folder is None and download:
        from torchvision.datasets import SVHN

        torchvision_download("SVHN", root / "svhn",
                             lambda: [SVHN(str(root / "svhn"), split=s, download=True) for s in SVHN_FILES])
        folder = root / "svhn"
    if folder is None:
        raise missing_data("SVHN", root / "svhn", f"svhn/{SVHN_FILES['train']} and svhn/{SVHN_FILES['test']}")
    try:
        train, test = read_svhn(folder / SVHN_FILES["train"]), read_svhn(folder / SVHN_FILES["test"])
    except Exception as error:
        raise unreadable_data("SVHN", folder, error) from None
    train, val = hold_out_validation(train)
    return ImageSplits("svhn", train, val, test)
