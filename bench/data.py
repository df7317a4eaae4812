"""Datasets as uint8 image tensors, and seeded index streams that batch them.

Small datasets live as one uint8 tensor (N, 3, H, W) on the training device; a batch is `images[indices]`,
so the training loop does no per-sample Python work.

`photos` (the default, offline): 32x32 patches cut from the RGB photographs that ship inside scikit-image's
wheel. Only lossless PNG files are used, so every machine decodes the same bytes. Splits come from disjoint
photographs:
    train       coffee, immunohistochemistry (ihc), motorcycle_left, motorcycle_right   stride 16   4,525 patches
    validation  chelsea (the cat)                                                        stride 15     504 patches
    test        astronaut                                                                stride 16     961 patches
`cifar10`: the real CIFAR-10 python format (`<root>/cifar-10-batches-py/`), read from its pickles; the
validation split is a fixed seeded 5,000 of the 50,000 training images, the test split is `test_batch`.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from bench import UserError


@dataclass
class ImageSplits:
    name: str
    train: Tensor  # uint8 (N, 3, H, W)
    val: Tensor
    test: Tensor

    def to(self, device: torch.device) -> "ImageSplits":
        return ImageSplits(self.name, self.train.to(device), self.val.to(device), self.test.to(device))


def default_data_root() -> Path:
    return Path(os.environ.get("VQBENCH_DATA") or Path.home() / ".cache" / "vq-bench" / "data")


# --- photos -------------------------------------------------------------------------------------------------

PATCH = 32
PHOTO_SPLITS = {  # split -> [(file in skimage/data, stride)]
    "train": [("coffee.png", 16), ("ihc.png", 16), ("motorcycle_left.png", 16), ("motorcycle_right.png", 16)],
    "val": [("chelsea.png", 15)],
    "test": [("astronaut.png", 16)],
}


def cut_patches(image: np.ndarray, size: int, stride: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (N, 3, size, size) uint8, every window on a regular grid, row-major."""
    h, w, _ = image.shape
    rows = range(0, h - size + 1, stride)
    cols = range(0, w - size + 1, stride)
    patches = [image[r:r + size, c:c + size] for r in rows for c in cols]
    return np.ascontiguousarray(np.stack(patches).transpose(0, 3, 1, 2))


def load_photos(data_root: Path | None = None, download: bool = False) -> ImageSplits:
    import skimage
    from skimage import io

    photo_dir = Path(skimage.__file__).parent / "data"
    splits = {}
    for split, photos in PHOTO_SPLITS.items():
        parts = []
        for file, stride in photos:
            path = photo_dir / file
            if not path.exists():
                raise UserError(f"scikit-image's photograph {path} is missing; reinstall it: pip install --force-reinstall scikit-image")
            parts.append(cut_patches(io.imread(path)[..., :3], PATCH, stride))
        splits[split] = torch.from_numpy(np.concatenate(parts))
    return ImageSplits("photos", splits["train"], splits["val"], splits["test"])


# --- CIFAR-10 -----------------------------------------------------------------------------------------------

CIFAR_DIR = "cifar-10-batches-py"
CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_VAL_SIZE = 5000
CIFAR_VAL_SEED = 20250710  # fixed for every run: the validation split must not depend on the run's seed


def read_cifar_batch(path: Path) -> np.ndarray:
    """One pickled CIFAR-10 batch -> (N, 3, 32, 32) uint8 (its `data` rows are 1024 R, 1024 G, 1024 B values)."""
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    data = batch[b"data"] if b"data" in batch else batch["data"]
    return np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32)


def load_cifar10(data_root: Path | None = None, download: bool = False) -> ImageSplits:
    root = Path(data_root) if data_root else default_data_root()
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
        raise UserError(f"CIFAR-10 files under {folder} are unreadable ({error}); delete them and pass --download") from None
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(CIFAR_VAL_SEED))
    val_size = min(CIFAR_VAL_SIZE, len(train) // 10)
    images = torch.from_numpy(train)
    return ImageSplits("cifar10", images[order[val_size:]], images[order[:val_size]], torch.from_numpy(test))


DATASETS: dict[str, Callable[..., ImageSplits]] = {"photos": load_photos, "cifar10": load_cifar10}


def list_datasets() -> list[str]:
    return sorted(DATASETS)


def load_dataset(name: str, data_root: str | Path | None = None, download: bool = False) -> ImageSplits:
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; valid datasets: {', '.join(list_datasets())}")
    if data_root is not None and not Path(data_root).is_dir():
        raise UserError(f"--data-root {data_root} is not a readable directory; pass an existing folder")
    return DATASETS[name](Path(data_root) if data_root else None, download)


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
