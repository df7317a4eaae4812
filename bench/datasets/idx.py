"""`mnist`, `fashion-mnist`: the idx ubyte files (raw or .gz), read here.

28x28 grayscale, zero-padded by 2 pixels on every side to 32x32 (both have black backgrounds, so padding adds no
content and keeps the pixels unresampled) and repeated to 3 channels. Validation: a fixed seeded 5,000 of the
60,000 training images; test: the 10,000 t10k images.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bench.datasets.common import (ImageSplits, data_root_or_default, hold_out_validation, missing_data,
                                   torchvision_download, unreadable_data)

IDX_FILES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
IDX_FOLDERS = {  # dataset -> (torchvision's folder, where torchvision puts the raw files, other folder names tried)
    "mnist": ("MNIST", ["MNIST/raw", "MNIST", "mnist"]),
    "fashion-mnist": ("FashionMNIST", ["FashionMNIST/raw", "FashionMNIST", "fashion-mnist"]),
}


def read_idx_images(path: Path) -> np.ndarray:
    """An idx3-ubyte image file (raw or gzip) -> (N, rows, cols) uint8. Header: two zero bytes, type code 0x08
    (unsigned byte), the number of dimensions (3), then each dimension as a big-endian int32."""
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 16 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or data[3] != 3:
        raise ValueError(f"not an idx3-ubyte image file (header {data[:4].hex()})")
    n, rows, cols = (int(v) for v in np.frombuffer(data, dtype=">i4", count=3, offset=4))
    if len(data) != 16 + n * rows * cols:
        raise ValueError(f"holds {len(data) - 16} bytes of pixels, the header says {n}x{rows}x{cols}")
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, rows, cols)


def gray_to_rgb32(images: np.ndarray) -> Tensor:
    """(N, 28, 28) uint8 -> (N, 3, 32, 32) uint8: 2 zero pixels of padding on each side, the channel repeated."""
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    return torch.from_numpy(np.ascontiguousarray(np.repeat(padded[:, None], 3, axis=1)))


def find_idx_file(root: Path, folders: list[str], stem: str) -> Path | None:
    for folder in folders:
        for name in (stem, stem + ".gz"):
            if (root / folder / name).is_file():
                return root / folder / name
    return None


def load_idx_dataset(name: str, data_root: Path | None, download: bool) -> ImageSplits:
    root = data_root_or_default(data_root)
    torchvision_name, folders = IDX_FOLDERS[name]
    paths = {split: find_idx_file(root, folders, stem) for split, stem in IDX_FILES.items()}
    if download and None in paths.values():
        import torchvision.datasets

        cls = getattr(torchvision.datasets, torchvision_name)
        torchvision_download(name, root, lambda: [cls(str(root), train=t, download=True) for t in (True, False)])
        paths = {split: find_idx_file(root, folders, stem) for split, stem in IDX_FILES.items()}
    if None in paths.values():
        raise missing_data(name, root / folders[0], f"{folders[0]}/{IDX_FILES['train']}[.gz] and "
                                                    f"{IDX_FILES['test']}[.gz]")
    try:
        train, test = (gray_to_rgb32(read_idx_images(paths[split])) for split in ("train", "test"))
    except Exception as error:
        raise unreadable_data(name, paths["train"].parent, error) from None
    train, val = hold_out_validation(train)
    return ImageSplits(name, train, val, test)


def load_mnist(data_root: Path | None = None, download: bool = False) -> ImageSplits:
    return load_idx_dataset("mnist", data_root, download)


def load_fashion_mnist(data_root: Path | None = None, download: bool = False) -> ImageSplits:
    return load_idx_dataset("fashion-mnist", data_root, download)
