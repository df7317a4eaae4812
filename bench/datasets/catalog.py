"""The one table of datasets, and the --dataset names it parses: LOADER[@SIZE][:PATH].

Adding a dataset is one loader module and one `DatasetInfo` row here. The dataset string is part of the RunSpec,
so the size is part of the run's identity.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bench import UserError
from bench.datasets.celeba import CELEBA_SIZE, load_celeba
from bench.datasets.cifar import load_cifar10
from bench.datasets.common import ImageSplits
from bench.datasets.folders import IMAGEFOLDER_SIZE, load_imagefolder
from bench.datasets.hf import HF_SIZE, load_hf
from bench.datasets.idx import load_fashion_mnist, load_mnist
from bench.datasets.photos import PATCH, load_photos
from bench.datasets.svhn import load_svhn


@dataclass(frozen=True)
class DatasetInfo:
    """One dataset: its loader, called as loader(data_root, download[, size=S][, path=P]) -> ImageSplits, and the
    side length of its images (the default one where it is resizable)."""

    name: str
    loader: Callable[..., ImageSplits]
    image_size: int
    resizable: bool = False  # takes NAME@SIZE
    needs_path: bool = False  # takes NAME:PATH
    path_name: str = "PATH"  # how --list and errors name what follows the ':'
    path_what: str = "a folder"


DATASETS: dict[str, DatasetInfo] = {info.name: info for info in [
    DatasetInfo("photos", load_photos, PATCH),
    DatasetInfo("cifar10", load_cifar10, 32),
    DatasetInfo("mnist", load_mnist, 32),
    DatasetInfo("fashion-mnist", load_fashion_mnist, 32),
    DatasetInfo("svhn", load_svhn, 32),
    DatasetInfo("celeba", load_celeba, CELEBA_SIZE, resizable=True),
    DatasetInfo("imagefolder", load_imagefolder, IMAGEFOLDER_SIZE, resizable=True, needs_path=True),
    DatasetInfo("hf", load_hf, HF_SIZE, resizable=True, needs_path=True, path_name="NAME[:COLUMN]",
                path_what="a Hugging Face Hub id or a local dataset directory"),
]}


@dataclass(frozen=True)
class DatasetName:
    """A --dataset value parsed: LOADER[@SIZE][:PATH], e.g. cifar10, celeba@64, imagefolder@128:/data/ffhq."""

    loader: str
    size: int | None = None
    path: str | None = None


def parse_dataset(name: str) -> DatasetName:
    head, colon, path = name.partition(":")
    loader, at, size_text = head.partition("@")
    resizable = [n for n, info in DATASETS.items() if info.resizable]
    if loader not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; valid datasets: {', '.join(list_datasets())} "
                        f"({' and '.join(resizable)} take @SIZE, e.g. imagefolder@128:DIR)")
    info = DATASETS[loader]
    size = None
    if at:
        if not info.resizable:
            raise UserError(f"dataset {loader} has a fixed size ({info.image_size}x{info.image_size}); "
                            f"only {', '.join(resizable)} take @SIZE")
        if not size_text.isdigit() or int(size_text) <= 0:
            raise UserError(f"dataset {name!r}: @SIZE must be a positive integer, got {size_text!r}")
        size = int(size_text)
    if info.needs_path and not path:
        raise UserError(f"dataset {loader} needs {info.path_what}: --dataset {loader}:{info.path_name}")
    if not info.needs_path and colon:
        raise UserError(f"dataset {loader} takes no :PATH (its files are found under --data-root)")
    return DatasetName(loader, size, path or None)


def image_size(name: str) -> int:
    """The side length of the images `load_dataset(name)` gives, without loading anything."""
    parsed = parse_dataset(name)
    return parsed.size or DATASETS[parsed.loader].image_size


def list_datasets() -> list[str]:
    return sorted(f"{n}:{info.path_name}" if info.needs_path else n for n, info in DATASETS.items())


def load_dataset(name: str, data_root: str | Path | None = None, download: bool = False) -> ImageSplits:
    parsed = parse_dataset(name)
    if data_root is not None and not Path(data_root).is_dir():
        raise UserError(f"--data-root {data_root} is not a readable directory; pass an existing folder")
    extras = {}
    if parsed.size is not None:
        extras["size"] = parsed.size
    if parsed.path is not None:
        extras["path"] = parsed.path
    return DATASETS[parsed.loader].loader(Path(data_root) if data_root else None, download, **extras)
