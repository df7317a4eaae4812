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
`mnist`, `fashion-mnist`: the idx ubyte files (raw or .gz), 28x28 zero-padded to 32x32, gray repeated to RGB.
`svhn`: train_32x32.mat / test_32x32.mat (scipy.io). For these three the validation split is a fixed seeded
5,000 of the training images. Every loader reads the on-disk format itself: torchvision's classes are only
used to download (`--download`), since they insist on checksums of the full files.

Large sets are streamed from disk instead (`ImageFiles`: decoded on demand by a thread pool, never held whole):
`celeba` (torchvision's layout, centre 140x140 crop resized to 128x128) and `imagefolder:PATH` (FFHQ, ImageNet,
any folder of images; shorter side resized to 256, centre-cropped). Both take a size: `celeba@64`,
`imagefolder@128:PATH`. The dataset string is part of the RunSpec, so the size is part of the run's identity.
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
    train: Tensor  # uint8 (N, 3, H, W); for datasets streamed from disk an ImageFiles that indexes like one
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


def hold_out_validation(images: Tensor, seed: int = CIFAR_VAL_SEED) -> tuple[Tensor, Tensor]:
    """A fixed seeded min(5,000, N / 10) of a training set as the validation split -> (train, val)."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    val_size = min(CIFAR_VAL_SIZE, len(images) // 10)
    return images[order[val_size:]], images[order[:val_size]]


def missing_data(what: str, where: Path, holding: str) -> UserError:
    return UserError(f"{what} not found: {where}; pass --data-root DIR (a folder holding {holding}, or set "
                     f"VQBENCH_DATA) or --download to fetch it")


def torchvision_download(what: str, root: Path, fetch: Callable[[], object]) -> None:
    """Let torchvision fetch a dataset into `root`; offline machines fail at name resolution: say what to do."""
    try:
        fetch()
    except Exception as error:
        raise UserError(f"downloading {what} into {root} failed ({type(error).__name__}: {error}); copy its files "
                        f"there by hand and pass --data-root") from None


# --- MNIST and Fashion-MNIST: the idx ubyte files (optionally .gz), read here -------------------------------------
# 28x28 grayscale, zero-padded by 2 pixels on every side to 32x32 (both have black backgrounds, so padding adds
# no content and keeps the pixels unresampled) and repeated to 3 channels. Validation: a fixed seeded
# 5,000 of the 60,000 training images; test: the 10,000 t10k images.

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
    root = Path(data_root) if data_root else default_data_root()
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
        raise UserError(f"{name} files under {paths['train'].parent} are unreadable ({error}); delete them and "
                        f"pass --download") from None
    train, val = hold_out_validation(train)
    return ImageSplits(name, train, val, test)


def load_mnist(data_root: Path | None = None, download: bool = False) -> ImageSplits:
    return load_idx_dataset("mnist", data_root, download)


def load_fashion_mnist(data_root: Path | None = None, download: bool = False) -> ImageSplits:
    return load_idx_dataset("fashion-mnist", data_root, download)


# --- SVHN: the cropped-digits .mat files (train_32x32.mat, test_32x32.mat), read with scipy ----------------------
# X is (32, 32, 3, N) uint8; the labels y are not needed. `extra` is not used. Validation: a fixed seeded
# 5,000 of the 73,257 training images.

SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}


def read_svhn(path: Path) -> Tensor:
    from scipy.io import loadmat

    x = loadmat(str(path), variable_names=["X"])["X"]  # (32, 32, 3, N)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise ValueError(f"X has shape {x.shape}, expected (32, 32, 3, N)")
    return torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1)).astype(np.uint8, copy=False))


def load_svhn(data_root: Path | None = None, download: bool = False) -> ImageSplits:
    root = Path(data_root) if data_root else default_data_root()
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
        raise UserError(f"SVHN files under {folder} are unreadable ({error}); delete them and pass "
                        f"--download") from None
    train, val = hold_out_validation(train)
    return ImageSplits("svhn", train, val, test)


# --- image files streamed from disk (CelebA, image folders) ----------------------------------------------------------

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


def resize_center_crop(image, size: int) -> np.ndarray:
    """PIL image -> (3, size, size) uint8: shorter side to `size` (bicubic, antialiased), then the centre square."""
    from PIL import Image

    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8).transpose(2, 0, 1)


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

    def prefetch(self, key) -> None:
        """Start decoding `self[key]` in the background; the next `self[key]` asking for exactly these positions
        gets it without waiting for the disk (a training loop knows its next batch: IndexStream is seeded)."""
        positions = self.positions(key)
        self._pending = (positions, prefetch_pool().submit(self.decode, positions))

    def load(self, positions: list[int]) -> Tensor:
        """uint8 (len(positions), 3, S, S) on self.device."""
        if not positions:
            return torch.empty((0, 3, self.size, self.size), dtype=torch.uint8, device=self.device)
        pending, self._pending = self._pending, None
        batch = pending[1].result() if pending is not None and pending[0] == positions else self.decode(positions)
        if self.device.type == "cuda":
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch.to(self.device)

    def decode(self, positions: list[int]) -> Tensor:
        return torch.from_numpy(np.stack(list(decode_pool().map(self.read, positions))))

    def read(self, position: int) -> np.ndarray:
        from PIL import Image

        path = self.files[position]
        try:
            with Image.open(path) as image:
                return self.transform(image.convert("RGB"))
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


def file_splits(name: str, splits: dict[str, list[Path]], transform: Callable[..., np.ndarray], size: int,
                where: Path) -> ImageSplits:
    for split in ("train", "val", "test"):
        if not splits[split]:
            raise UserError(f"{name}: the {split} split under {where} holds no image files "
                            f"({', '.join(IMAGE_SUFFIXES)})")
    parts = [ImageFiles([str(f) for f in splits[s]], transform, size) for s in ("train", "val", "test")]
    return ImageSplits(name, *parts)


# --- CelebA: torchvision's on-disk layout, streamed ----------------------------------------------------------------
# <root>/celeba/img_align_celeba/*.jpg (178x218 aligned faces) and <root>/celeba/list_eval_partition.txt (one
# "000001.jpg 0" line per image: 0 train, 1 validation, 2 test). Each image: the centre 140x140 crop, resized
# (bicubic) to 128x128 (the VQ-VAE literature's and the MQ paper's CelebA setting; the MQ authors crop at a random
# position, we crop the centre so every method sees the same pixels). `celeba@64` gives 64x64. Without the
# partition file, the images are split by name hashing as an image folder is.

CELEBA_DIR, CELEBA_IMAGES, CELEBA_PARTITION = "celeba", "img_align_celeba", "list_eval_partition.txt"
CELEBA_CROP, CELEBA_SIZE = 140, 128


def load_celeba(data_root: Path | None = None, download: bool = False, size: int | None = None) -> ImageSplits:
    import functools

    size = size or CELEBA_SIZE
    root = Path(data_root) if data_root else default_data_root()
    folder = root / CELEBA_DIR
    if download and not (folder / CELEBA_IMAGES).is_dir():
        from torchvision.datasets import CelebA

        torchvision_download("CelebA", root, lambda: CelebA(str(root), split="all", target_type=[], download=True))
    images = folder / CELEBA_IMAGES
    if not images.is_dir():
        raise missing_data("CelebA", images, f"{CELEBA_DIR}/{CELEBA_IMAGES}/*.jpg and {CELEBA_DIR}/{CELEBA_PARTITION}")
    partition = folder / CELEBA_PARTITION
    if partition.is_file():
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
        splits = {k: sorted(v) for k, v in splits.items()}
    else:
        splits = split_by_hash(list_images(images), images, test=True)
    transform = functools.partial(center_crop_resize, crop=CELEBA_CROP, size=size)
    return file_splits("celeba" if size == CELEBA_SIZE else f"celeba@{size}", splits, transform, size, images)


# --- image folders (FFHQ, ImageNet, your own photos), streamed --------------------------------------------------------
# `imagefolder:PATH` (or `imagefolder@SIZE:PATH`): every image resized so that its shorter side is SIZE (default
# 256; bicubic, antialiased) and centre-cropped to SIZE x SIZE. Splits: see folder_splits. A relative PATH is
# looked up under --data-root when one is given, else in the working directory, else under the default data root.

IMAGEFOLDER_SIZE = 256


def resolve_folder(path: str, data_root: Path | None) -> Path:
    folder = Path(path).expanduser()
    if folder.is_absolute():
        return folder
    if data_root is not None:
        return Path(data_root) / folder
    return folder if folder.exists() else default_data_root() / folder


def load_imagefolder(data_root: Path | None = None, download: bool = False, size: int | None = None,
                     path: str | None = None) -> ImageSplits:
    import functools

    size = size or IMAGEFOLDER_SIZE
    folder = resolve_folder(path, data_root)
    if not folder.is_dir():
        raise UserError(f"image folder {folder} does not exist; pass --dataset imagefolder:DIR with a folder of "
                        f"images (a relative DIR is looked up under --data-root); --download cannot fetch a folder")
    splits = folder_splits(folder)
    transform = functools.partial(resize_center_crop, size=size)
    return file_splits(f"imagefolder@{size}:{folder}", splits, transform, size, folder)


# --- the registry ---------------------------------------------------------------------------------------------------

DATASETS: dict[str, Callable[..., ImageSplits]] = {
    "photos": load_photos, "cifar10": load_cifar10, "mnist": load_mnist, "fashion-mnist": load_fashion_mnist,
    "svhn": load_svhn, "celeba": load_celeba, "imagefolder": load_imagefolder,
}
IMAGE_SIZES = {"photos": PATCH, "cifar10": 32, "mnist": 32, "fashion-mnist": 32, "svhn": 32, "celeba": CELEBA_SIZE,
               "imagefolder": IMAGEFOLDER_SIZE}
RESIZABLE = ("celeba", "imagefolder")  # take NAME@SIZE
NEEDS_PATH = ("imagefolder",)  # take NAME:PATH


@dataclass(frozen=True)
class DatasetName:
    """A --dataset value parsed: LOADER[@SIZE][:PATH], e.g. cifar10, celeba@64, imagefolder@128:/data/ffhq."""

    loader: str
    size: int | None = None
    path: str | None = None


def parse_dataset(name: str) -> DatasetName:
    head, colon, path = name.partition(":")
    loader, at, size_text = head.partition("@")
    if loader not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; valid datasets: {', '.join(list_datasets())} "
                        f"({' and '.join(RESIZABLE)} take @SIZE, e.g. imagefolder@128:DIR)")
    size = None
    if at:
        if loader not in RESIZABLE:
            raise UserError(f"dataset {loader} has a fixed size ({IMAGE_SIZES[loader]}x{IMAGE_SIZES[loader]}); "
                            f"only {', '.join(RESIZABLE)} take @SIZE")
        if not size_text.isdigit() or int(size_text) <= 0:
            raise UserError(f"dataset {name!r}: @SIZE must be a positive integer, got {size_text!r}")
        size = int(size_text)
    if loader in NEEDS_PATH and not path:
        raise UserError(f"dataset {loader} needs a folder: --dataset {loader}:DIR")
    if loader not in NEEDS_PATH and colon:
        raise UserError(f"dataset {loader} takes no :PATH (its files are found under --data-root)")
    return DatasetName(loader, size, path or None)


def image_size(name: str) -> int:
    """The side length of the images `load_dataset(name)` gives, without loading anything."""
    parsed = parse_dataset(name)
    return parsed.size or IMAGE_SIZES[parsed.loader]


def list_datasets() -> list[str]:
    return sorted(f"{n}:PATH" if n in NEEDS_PATH else n for n in DATASETS)


def load_dataset(name: str, data_root: str | Path | None = None, download: bool = False) -> ImageSplits:
    parsed = parse_dataset(name)
    if data_root is not None and not Path(data_root).is_dir():
        raise UserError(f"--data-root {data_root} is not a readable directory; pass an existing folder")
    extras = {}
    if parsed.size is not None:
        extras["size"] = parsed.size
    if parsed.path is not None:
        extras["path"] = parsed.path
    return DATASETS[parsed.loader](Path(data_root) if data_root else None, download, **extras)


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
