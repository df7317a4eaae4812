"""`celeba`: torchvision's on-disk layout of CelebA, streamed from disk.

<root>/celeba/img_align_celeba/*.jpg (178x218 aligned faces) and <root>/celeba/list_eval_partition.txt (one
"000001.jpg 0" line per image: 0 train, 1 validation, 2 test). Each image: the centre 140x140 crop, resized
(bicubic) to 128x128 (the VQ-VAE literature's and the MQ paper's CelebA setting; the MQ authors crop at a random
position, we crop the centre so every method sees the same pixels). `celeba@64` gives 64x64. Without the
partition file, the images are split by name hashing as an image folder is.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

from bench import UserError
from bench.datasets.common import ImageSplits, data_root_or_default, missing_data, torchvision_download
from bench.datasets.files import center_crop_resize, file_splits, list_images, split_by_hash

CELEBA_DIR, CELEBA_IMAGES, CELEBA_PARTITION = "celeba", "img_align_celeba", "list_eval_partition.txt"
CELEBA_CROP, CELEBA_SIZE = 140, 128


def partition_splits(partition: Path, images: Path) -> dict[str, list[Path]]:
    """list_eval_partition.txt -> {"train", "val", "test"} lists of files in `images`, each sorted by path."""
    splits: dict[str, list[Path]] = {"train": [], "val": [], "test": []}
    present = set(os.listdir(images))
    missing = []
    for line in partition.read_text().split("\n"):
        fields = line.split()
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            if fields:
                raise UserError(f"{partition}: unexpected line {line!r} (expected 'NAME.jpg 0|1|2')")
            continue
        if fields[0] not in present:
            missing.append(fields[0])
        splits[("train", "val", "test")[int(fields[1])]].append(images / fields[0])
    if missing:
        raise UserError(f"CelebA: {len(missing)} image(s) listed in {partition} are missing from {images} "
                        f"(first: {missing[0]}); extract img_align_celeba completely or pass --download")
    return {k: sorted(v) for k, v in splits.items()}


def load_celeba(data_root: Path | None = None, download: bool = False, size: int | None = None) -> ImageSplits:
    size = size or CELEBA_SIZE
    root = data_root_or_default(data_root)
    folder = root / CELEBA_DIR
    if download and not (folder / CELEBA_IMAGES).is_dir():
        from torchvision.datasets import CelebA

        torchvision_download("CelebA", root, lambda: CelebA(str(root), split="all", target_type=[], download=True))
    images = folder / CELEBA_IMAGES
    if not images.is_dir():
        raise missing_data("CelebA", images, f"{CELEBA_DIR}/{CELEBA_IMAGES}/*.jpg and {CELEBA_DIR}/{CELEBA_PARTITION}")
    partition = folder / CELEBA_PARTITION
    if partition.is_file():
        splits = partition_splits(partition, images)
    else:
        splits = split_by_hash(list_images(images), images, test=True)
    transform = functools.partial(center_crop_resize, crop=CELEBA_CROP, size=size)
    return file_splits("celeba" if size == CELEBA_SIZE else f"celeba@{size}", splits, transform, size, images)
