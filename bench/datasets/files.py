"""Image files streamed from disk (CelebA, image folders): `ImageFiles` decodes a batch on demand with a thread
pool and is never held whole; the transforms that bring every image to one square size; listing a folder's images
and splitting them by name hashing."""
from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from bench import UserError
from bench.datasets.augment import crop_box
from bench.datasets.common import ImageSplits

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
_DECODE_POOL = _PREFETCH_POOL = None


def decode_pool():
    """One process-wide thread pool: PIL releases the GIL while it decodes and resizes, so threads scale."""
    global _DECODE_POOL
    if _DECODE_POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        workers = int(os.environ.get("VQBENCH_DATA_WORKERS") or min(16, os.cpu_count() or 1))
        _DECODE_POOL = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="vqbench-decode")
    return _DECODE_POOL


def prefetch_pool():
    """One thread that waits on a prefetched batch's decoding (which runs on the decode pool: a task of the decode
    pool waiting on its own pool could starve it)."""
    global _PREFETCH_POOL
    if _PREFETCH_POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _PREFETCH_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vqbench-prefetch")
    return _PREFETCH_POOL


def resize_center_crop(image, size: int, draw: tuple[float, float, float, bool] | None = None) -> np.ndarray:
    """PIL image -> (3, size, size) uint8: shorter side to `size` (bicubic, antialiased), then the centre square;
    with a training draw (side, x, y, flip) of bench.datasets.augment, that square of the resized image instead,
    brought back to `size` and mirrored when flip."""
    from PIL import Image

    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    if draw is None:
        left, top = (new_w - size) // 2, (new_h - size) // 2
        return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8).transpose(2, 0, 1)
    side, x, y, flip = draw
    image = image.crop(crop_box(new_w, new_h, side, x, y))
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


def center_crop_resize(image, crop: int, size: int) -> np.ndarray:
    """PIL image -> (3, size, size) uint8: the centre crop x crop square, then resized (bicubic) to size x size."""
    from PIL import Image

    w, h = image.size
    crop = min(crop, w, h)
    left, top = (w - crop) // 2, (h - crop) // 2
    image = image.crop((left, top, left + crop, top + crop))
    if crop != size:
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


class ImageFiles:
    """A split of image files on disk, decoded on demand, never held in memory as a whole.

    Behaves like the uint8 (N, 3, S, S) tensor of an in-memory split where the harness touches one: `len(split)`,
    `split[indices]` (a LongTensor, list or array), `split[start:stop]`, `split[i]`, `.shape`, `.dtype`, `.device`
    and `.to(device)`. A batch is decoded by the process-wide thread pool, stacked, and moved to `device` (through
    pinned memory on CUDA). Indices on a GPU are copied to the host first: disk reads need them there.
    """

    dtype = torch.uint8

    def __init__(self, files: list[str], transform: Callable[..., np.ndarray], size: int,
                 device: torch.device | str = "cpu"):
        self.files = [str(f) for f in files]
        self.transform, self.size = transform, size
        self.device = torch.device(device)
        self._pending = None  # (positions, Future of the decoded CPU batch) started by prefetch()

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.files), 3, self.size, self.size))

    def to(self, device: torch.device | str) -> "ImageFiles":
        return ImageFiles(self.files, self.transform, self.size, device)

    def positions(self, key) -> list[int]:
        if isinstance(key, slice):
            return list(range(*key.indices(len(self))))
        return torch.as_tensor(key).reshape(-1).tolist()

    def __getitem__(self, key) -> Tensor:
        if isinstance(key, (int, np.integer)):
            return self.load([int(key)])[0]
        return self.load(self.positions(key))

    @property
    def crops_at_decode(self) -> bool:
        """Whether training crops are taken while decoding, from the resized image (see bench.datasets.augment)."""
        return type(self).decode is ImageFiles.decode and "draw" in inspect.signature(self.transform).parameters

    def augmented(self, key, draws) -> Tensor:
        """`self[key]` decoded with the training crops and flips of `draws` (bench.datasets.augment.CropDraws)."""
        return self.load(self.positions(key), draws)

    def prefetch(self, key, draws=None) -> None:
        """Start decoding `self[key]` (or `self.augmented(key, draws)`) in the background; the next call asking for
        exactly this gets it without waiting for the disk (a training loop knows its next batch: it is seeded)."""
        positions = self.positions(key)
        args = (positions,) if draws is None else (positions, draws)  # subclasses decode without crops
        self._pending = ((positions, draws), prefetch_pool().submit(self.decode, *args))

    def load(self, positions: list[int], draws=None) -> Tensor:
        """uint8 (len(positions), 3, S, S) on self.device."""
        if not positions:
            return torch.empty((0, 3, self.size, self.size), dtype=torch.uint8, device=self.device)
        pending, self._pending = self._pending, None
        if pending is not None and pending[0][0] == positions and pending[0][1] is draws:
            batch = pending[1].result()
        else:
            batch = self.decode(positions) if draws is None else self.decode(positions, draws)
        if self.device.type == "cuda":
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch.to(self.device)

    def decode(self, positions: list[int], draws=None) -> Tensor:
        rows = [None] * len(positions) if draws is None else [draws.row(i) for i in range(len(positions))]
        return torch.from_numpy(np.stack(list(decode_pool().map(self.read, positions, rows))))

    def read(self, position: int, draw=None) -> np.ndarray:
        from PIL import Image

        path = self.files[position]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                return self.transform(image) if draw is None else self.transform(image, draw=draw)
        except Exception as error:
            raise UserError(f"image file {path} is unreadable ({type(error).__name__}: {error}); replace or delete "
                            f"it") from None


def list_images(folder: Path) -> list[Path]:
    """Every image file under `folder` (recursively: ImageNet keeps one subfolder per class), sorted by path;
    hidden files and folders are skipped."""
    found = []
    for directory, subdirs, files in os.walk(folder, followlinks=True):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        found += [Path(directory) / f for f in files if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES)]
    return sorted(found)


# A split made by name hashing: files ordered by sha1 of their path relative to the dataset folder (so the split does
# not depend on the order files were listed in, on the machine, or on files added later elsewhere in the order);
# the first TEST_FRACTION are the test split, the next VAL_FRACTION (at most VAL_MAX) the validation split.
TEST_FRACTION, VAL_FRACTION, VAL_MAX = 0.1, 0.05, 5000


def hash_order(files: list[Path], folder: Path) -> list[Path]:
    import hashlib

    return sorted(files, key=lambda f: hashlib.sha1(f.relative_to(folder).as_posix().encode()).hexdigest())


def split_by_hash(files: list[Path], folder: Path, test: bool) -> dict[str, list[Path]]:
    """-> {"train", "val"[, "test"]} lists, each sorted by path. test=False: only a validation split is carved out."""
    n = len(files)
    n_test = max(1, round(TEST_FRACTION * n)) if test else 0
    n_val = max(1, min(VAL_MAX, round(VAL_FRACTION * n)))
    if n - n_test - n_val < 1:
        raise UserError(f"{folder} holds {n} image(s): too few to split into train, validation and test; add images")
    order = hash_order(files, folder)
    splits = {"val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
    if test:
        splits["test"] = order[:n_test]
    return {k: sorted(v) for k, v in splits.items()}


def split_fingerprint(splits: dict[str, list[Path]], where: Path) -> str:
    """sha256 of each split's file list (paths relative to the dataset folder): what fixes a streamed dataset's
    splits. Deleting, adding or renaming an image changes it (and, in a split made by name hashing, moves other
    images between splits); a run's checkpoint stores it and refuses to resume onto another."""
    import hashlib

    digest = hashlib.sha256()
    for split in ("train", "val", "test"):
        digest.update(f"[{split}]\n".encode())
        for f in splits[split]:
            path = Path(f)
            relative = path.relative_to(where) if path.is_relative_to(where) else path
            digest.update(relative.as_posix().encode() + b"\n")
    return digest.hexdigest()


def file_splits(name: str, splits: dict[str, list[Path]], transform: Callable[..., np.ndarray], size: int,
                where: Path) -> ImageSplits:
    for split in ("train", "val", "test"):
        if not splits[split]:
            raise UserError(f"{name}: the {split} split under {where} holds no image files "
                            f"({', '.join(IMAGE_SUFFIXES)})")
    parts = [ImageFiles([str(f) for f in splits[s]], transform, size) for s in ("train", "val", "test")]
    info = {"fingerprint": split_fingerprint(splits, where), "folder": str(where),
            "files": {s: len(splits[s]) for s in ("train", "val", "test")}}
    return ImageSplits(name, *parts, info=info)


def header_error(path: str) -> str | None:
    """Why an image file cannot be opened (its header read and its format identified), or None."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
        if not width or not height:
            return f"{path}: empty image ({width}x{height})"
    except Exception as error:
        return f"{path}: {type(error).__name__}: {error}"
    return None


def check_readable(data: ImageSplits) -> None:
    """Before step 0: open every image file of a streamed dataset and read its header, on the decode thread
    pool (in-memory datasets were decoded whole when loaded). About 0.1 ms a file from the page cache: 20 s on
    2 cores for CelebA's 202,599 files; a cold disk costs one read per file. A pixel-level fault past a valid
    header (a truncated JPEG) is still found only when the file is decoded."""
    files = [f for split in (data.train, data.val, data.test) if isinstance(split, ImageFiles) for f in split.files]
    chunks = [files[i:i + 512] for i in range(0, len(files), 512)]
    errors = [e for chunk in decode_pool().map(lambda c: [header_error(f) for f in c], chunks) for e in chunk if e]
    if errors:
        raise UserError(f"{len(errors)} of {len(files)} image files of {data.name} are unreadable (first: {errors[0]}); "
                        f"replace them (deleting one changes the file list, and so the hashed split: a run "
                        f"checkpointed before then refuses to resume)")
