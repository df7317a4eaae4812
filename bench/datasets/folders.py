"""`imagefolder:PATH` (FFHQ, ImageNet, your own photos), streamed from disk.

`imagefolder@SIZE:PATH`: every image resized so that its shorter side is SIZE (default 256; bicubic, antialiased)
and centre-cropped to SIZE x SIZE. Splits: see folder_splits. A relative PATH is looked up under --data-root when
one is given, else in the working directory, else under the default data root.
"""
from __future__ import annotations

import functools
from pathlib import Path

from bench import UserError
from bench.datasets.common import ImageSplits, default_data_root
from bench.datasets.files import file_splits, list_images, resize_center_crop, split_by_hash

IMAGEFOLDER_SIZE = 256


def folder_splits(folder: Path) -> dict[str, list[Path]]:
    """train/val/test file lists of an image folder. Subfolders train/ and val/ (or validation/) and test/ are used
    as they are; train/ with only one of val/, validation/, test/ (ImageNet's layout): that one is the test split
    and the validation split is carved out of train/ by name hashing; no train/: every image under the folder,
    split by name hashing."""
    named = {name: folder / name for name in ("train", "val", "validation", "test") if (folder / name).is_dir()}
    if "train" not in named:
        return split_by_hash(list_images(folder), folder, test=True)
    train = list_images(named["train"])
    val_dir = named.get("val") or named.get("validation")
    if val_dir is not None and "test" in named:
        return {"train": train, "val": list_images(val_dir), "test": list_images(named["test"])}
    if val_dir is None and "test" not in named:
        return split_by_hash(train, named["train"], test=True)
    return {**split_by_hash(train, named["train"], test=False), "test": list_images(named.get("test") or val_dir)}


def resolve_folder(path: str, data_root: Path | None) -> Path:
    folder = Path(path).expanduser()
    if folder.is_absolute():
        return folder
    if data_root is not None:
        return Path(data_root) / folder
    return folder if folder.exists() else default_data_root() / folder


def load_imagefolder(data_root: Path | None = None, download: bool = False, size: int | None = None,
                     path: str | None = None) -> ImageSplits:
    size = size or IMAGEFOLDER_SIZE
    folder = resolve_folder(path, data_root)
    if not folder.is_dir():
        raise UserError(f"image folder {folder} does not exist; pass --dataset imagefolder:DIR with a folder of "
                        f"images (a relative DIR is looked up under --data-root); --download cannot fetch a folder")
    splits = folder_splits(folder)
    transform = functools.partial(resize_center_crop, size=size)
    return file_splits(f"imagefolder@{size}:{folder}", splits, transform, size, folder)
