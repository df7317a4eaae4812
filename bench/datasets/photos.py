"""`photos` (the default, offline): 32x32 patches cut from the RGB photographs that ship inside scikit-image's wheel.

Only lossless PNG files are used, so every machine decodes the same bytes. Splits come from disjoint photographs:
    train       coffee, immunohistochemistry (ihc), motorcycle_left, motorcycle_right   stride 16   4,525 patches
    validation  chelsea (the cat)                                                        stride 15     504 patches
    test        astronaut                                                                stride 16     961 patches
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bench import UserError
from bench.datasets.common import ImageSplits

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
