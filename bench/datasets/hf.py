"""`hf[@SIZE]:NAME[:COLUMN]`: any image dataset the Hugging Face `datasets` library loads.

NAME is a Hub id (`uoft-cs/cifar10`, `flwrlabs/celeba`, `bitmind/ffhq-256`, `ILSVRC/imagenet-1k`) or a local
directory: one written by `save_to_disk`, or any folder `datasets.load_dataset` reads (parquet files, an
`imagefolder` layout). A relative NAME that exists under --data-root, in the working directory or under the default
data root is that directory; anything else is a Hub id. Hub datasets live in the Hugging Face cache (`HF_HOME`,
`HF_DATASETS_CACHE`), not under --data-root; with `HF_DATASETS_OFFLINE=1` (or `HF_HUB_OFFLINE=1`) they load from
that cache without the network. Needs the optional package: `pip install -e ".[hf]"`.

- The image column: COLUMN when given, else the first column of feature type `Image` (a parquet column of
  {bytes, path} structs written without Hugging Face's metadata also counts).
- The splits: `train`; `validation` (or `valid`, `val`, `dev`) and `test`. With only one of validation and test,
  that one is the test split (as an ImageNet-style image folder); a missing validation split is a fixed seeded
  min(5,000, N / 10) of train (`common.hold_out_validation`, CIFAR-10's rule; so `hf:uoft-cs/cifar10` holds out the
  same rows as `cifar10` when its rows come in the original order), a missing test split likewise (another seed),
  held out before the validation split.
- Every image converted to RGB (EXIF orientation applied), its shorter side resized to SIZE (bicubic, antialiased)
  and centre-cropped; an image already SIZE x SIZE is left as it is. Without @SIZE: the images' own size when the
  first and last rows of every split are square and of one size, else 256.
- Small datasets (all splits together at most IN_MEMORY_BYTES decoded) become one uint8 tensor per split; larger
  ones stream: rows are read by index from the memory-mapped Arrow table and decoded by files.py's thread pool, the
  next batch prefetched.
- `ImageSplits.info` names the dataset (id, local path, config, column, which source split became which) and its
  fingerprint: a sha256 of each split's row count and the encoded bytes of its first and last images (the same on
  every machine), and the `datasets` library's own `_fingerprint` of each source split.
"""
from __future__ import annotations

import functools
import hashlib
import io
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bench import UserError
from bench.datasets.common import VAL_SEED, ImageSplits, default_data_root, hold_out_validation
from bench.datasets.files import ImageFiles, decode_pool, resize_center_crop

HF_SIZE = 256  # the size without @SIZE when the images differ in size (or are not square)
IN_MEMORY_BYTES = 1 << 30  # decoded size of all splits up to which a dataset becomes one tensor per split
TEST_SEED = VAL_SEED + 1  # the seeded hold-out of a missing test split; fixed for every run
VAL_NAMES = ("validation", "valid", "val", "dev")
PROBE_ROWS = 8  # rows read at each end of every split to find the images' own size
INSTALL = 'pip install -e ".[hf]" (or pip install datasets)'


def import_datasets():
    try:
        import datasets
    except ImportError as error:
        if error.name == "datasets":
            raise UserError(f"--dataset hf:... needs the Hugging Face `datasets` package, which is not installed: "
                            f"{INSTALL}") from None
        raise UserError(f"the Hugging Face `datasets` package failed to import ({error}); reinstall it: "
                        f"{INSTALL}") from None
    if not hasattr(datasets, "load_dataset"):  # e.g. a folder named datasets/ in the working directory
        raise UserError(f"`import datasets` found {getattr(datasets, '__path__', datasets)}, not the Hugging Face "
                        f"package; run from another directory or {INSTALL}")
    return datasets


# --- the name -------------------------------------------------------------------------------------------------

def split_name(path: str) -> tuple[str, str | None]:
    """'NAME[:COLUMN]' -> (NAME, COLUMN or None). Hub ids hold no ':', so the first ':' starts the column."""
    name, colon, column = path.partition(":")
    if not name or (colon and not column):
        raise UserError(f"--dataset hf:{path}: expected hf[@SIZE]:NAME[:COLUMN], e.g. hf:uoft-cs/cifar10 or "
                        f"hf@64:uoft-cs/cifar10:img")
    return name, column or None


def local_directory(name: str, data_root: Path | None) -> Path | None:
    """The local dataset directory NAME means, or None for a Hub id."""
    path = Path(name).expanduser()
    if path.is_absolute() or name.startswith(("./", "../", "~")):
        if not path.exists():
            raise UserError(f"--dataset hf:{name}: {path} does not exist; pass a directory written by save_to_disk, "
                            f"a folder of parquet files, or a Hugging Face Hub id")
        return path
    candidates = ([Path(data_root) / path] if data_root is not None else []) + [path, default_data_root() / path]
    return next((c for c in candidates if c.exists()), None)


def check_name(name: str) -> None:
    if "@" in name:
        head, _, tail = name.rpartition("@")
        fix = f"hf@{tail}:{head}" if tail.isdigit() else f"hf:{head}"
        raise UserError(f"--dataset hf:{name}: a Hub id holds no '@' (the size goes after the loader, as in "
                        f"imagefolder@SIZE:DIR; revisions are not supported): write --dataset {fix}")


# --- loading --------------------------------------------------------------------------------------------------

def offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def load_source(datasets, name: str, local: Path | None) -> tuple[dict, str | None]:
    """-> ({split name: datasets.Dataset}, config name)."""
    where = local if local is not None else name
    try:
        if local is not None and local.is_dir() and ((local / "dataset_dict.json").is_file()
                                                     or (local / "state.json").is_file()):
            loaded = datasets.load_from_disk(str(local))  # save_to_disk's layout
        else:
            loaded = datasets.load_dataset(str(where))
    except Exception as error:
        first = (str(error).strip().splitlines() or [""])[0][:300]
        if local is not None:
            hint = "pass a directory written by save_to_disk or a folder datasets.load_dataset reads (parquet files)"
        elif offline():
            hint = (f"offline mode is on and the Hugging Face cache ({datasets.config.HF_DATASETS_CACHE}) does not "
                    f"hold it: load it once with network access, or point HF_HOME / HF_DATASETS_CACHE at the cache "
                    f"that does, or pass a local directory")
        else:
            hint = ("check the id (https://huggingface.co/datasets/" + name + "), the network, and for gated datasets "
                    "`hf auth login` or HF_TOKEN; offline, set HF_DATASETS_OFFLINE=1 with a cache that holds it")
        raise UserError(f"Hugging Face dataset {str(where)!r} could not be loaded ({type(error).__name__}: {first}); "
                        f"{hint}") from None
    if isinstance(loaded, datasets.Dataset):
        loaded = {"train": loaded}
    if not isinstance(loaded, (dict, datasets.DatasetDict)) or not loaded:
        raise UserError(f"Hugging Face dataset {str(where)!r}: expected splits of images, got {type(loaded).__name__}")
    config = next((getattr(d.info, "config_name", None) for d in loaded.values()), None)
    return dict(loaded), config


def image_column(datasets, split, column: str | None, where: str) -> str:
    """COLUMN, or the first column of feature type Image (or a bare {bytes, path} struct) of `split`."""
    features = split.features

    def is_image(feature) -> bool:
        if isinstance(feature, datasets.Image):
            return True
        return isinstance(feature, dict) and set(feature) == {"bytes", "path"}

    if column is not None:
        if column not in features:
            raise UserError(f"Hugging Face dataset {where!r} has no column {column!r}; its columns: "
                            f"{', '.join(features)}")
        if not is_image(features[column]):
            raise UserError(f"Hugging Face dataset {where!r}: column {column!r} holds {features[column]}, not images; "
                            f"image columns: {', '.join(c for c in features if is_image(features[c])) or 'none'}")
        return column
    found = [c for c in features if is_image(features[c])]
    if not found:
        raise UserError(f"Hugging Face dataset {where!r} has no image column (feature type Image) among "
                        f"{', '.join(f'{c} ({type(f).__name__})' for c, f in features.items())}")
    return found[0]


def pick_splits(source: dict, where: str) -> dict[str, str | None]:
    """{"train", "val", "test"} -> the source split each comes from (None: held out of train)."""
    by_lower = {name.lower(): name for name in source}
    train = by_lower.get("train") or (next(iter(source)) if len(source) == 1 else None)
    if train is None:
        raise UserError(f"Hugging Face dataset {where!r} has no 'train' split (its splits: {', '.join(source)})")
    val = next((by_lower[n] for n in VAL_NAMES if n in by_lower), None)
    test = by_lower.get("test")
    if test is None and val is not None:
        val, test = None, val  # one held-out split: it is the test split, validation comes out of train
    return {"train": train, "val": val, "test": test}


class HFImages(ImageFiles):
    """A split of a Hugging Face dataset, decoded on demand: indexes like the uint8 (N, 3, S, S) tensor of an in-memory
    split, as ImageFiles does for files on disk. A batch's rows are read from the Arrow table in one go (the image
    column with decoding off: encoded bytes or a path), then decoded by the process-wide thread pool."""

    def __init__(self, table, column: str, feature, size: int, device: torch.device | str = "cpu"):
        self.table, self.column, self.feature = table, column, feature
        self.transform, self.size = functools.partial(resize_center_crop, size=size), size
        self.device = torch.device(device)
        self._pending = None

    def __len__(self) -> int:
        return len(self.table)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), 3, self.size, self.size))

    def to(self, device: torch.device | str) -> "HFImages":
        return HFImages(self.table, self.column, self.feature, self.size, device)

    def raw(self, positions: list[int]) -> list[dict]:
        return self.table[positions][self.column]

    def decode(self, positions: list[int]) -> Tensor:
        values = self.raw(positions)
        return torch.from_numpy(np.stack(list(decode_pool().map(self.read_value, values, positions))))

    def read_value(self, value: dict, position: int) -> np.ndarray:
        try:
            image = self.feature.decode_example(value).convert("RGB")
            if image.size == (self.size, self.size):
                return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)
            return self.transform(image)
        except Exception as error:
            raise UserError(f"image {position} of a Hugging Face dataset split is unreadable ({type(error).__name__}: "
                            f"{error}); fix or drop that row") from None

    def read(self, position: int) -> np.ndarray:
        return self.read_value(self.raw([position])[0], position)

    def materialize(self, chunk: int = 2048) -> Tensor:
        """The whole split as one uint8 CPU tensor."""
        parts = [self.decode(list(range(i, min(i + chunk, len(self))))) for i in range(0, len(self), chunk)]
        return torch.cat(parts) if parts else torch.empty((0, 3, self.size, self.size), dtype=torch.uint8)


def own_size(splits: dict[str, "HFImages"]) -> int:
    """The side of the first and last PROBE_ROWS images of every split when all are square and equal, else HF_SIZE."""
    from PIL import Image

    sizes = set()
    for split in splits.values():
        n = len(split)
        positions = sorted(set(range(min(n, PROBE_ROWS))) | set(range(max(0, n - PROBE_ROWS), n)))
        for value in split.raw(positions):
            if value.get("bytes") is not None:
                with Image.open(io.BytesIO(value["bytes"])) as image:  # reads the header only
                    sizes.add(image.size)
            else:
                sizes.add(split.feature.decode_example(value).size)
    if len(sizes) == 1:
        (w, h), = sizes
        if w == h:
            return w
    return HF_SIZE


def fingerprint(splits: dict[str, "HFImages"]) -> str:
    """sha256 over each split's row count and the encoded bytes (or path) of its first and last images."""
    digest = hashlib.sha256()
    for key, split in splits.items():
        digest.update(f"{key}:{len(split)};".encode())
        if len(split):
            for value in split.raw([0, len(split) - 1]):
                digest.update(value["bytes"] if value.get("bytes") is not None else str(value.get("path")).encode())
    return digest.hexdigest()


def load_hf(data_root: Path | None = None, download: bool = False, size: int | None = None,
            path: str | None = None) -> ImageSplits:
    """`download` is not needed: the `datasets` library downloads into its own cache unless it is offline."""
    datasets = import_datasets()
    name, column = split_name(path or "")
    local = local_directory(name, data_root)
    if local is None:
        check_name(name)
    where = str(local) if local is not None else name
    source, config = load_source(datasets, name, local)
    chosen = pick_splits(source, where)
    column = image_column(datasets, source[chosen["train"]], column, where)
    tables = {}
    for key, split_name_ in chosen.items():
        if split_name_ is not None:
            split = source[split_name_]
            if column not in split.features:
                raise UserError(f"Hugging Face dataset {where!r}: split {split_name_!r} has no column {column!r}")
            tables[key] = split.select_columns([column]).cast_column(column, datasets.Image(decode=False))
    train = tables["train"]
    if chosen["test"] is None:
        rest, test = hold_out_validation(torch.arange(len(train)), seed=TEST_SEED)
        train, tables["test"] = train.select(rest.tolist()), train.select(test.tolist())
    if chosen["val"] is None:
        rest, val = hold_out_validation(torch.arange(len(train)), seed=VAL_SEED)
        train, tables["val"] = train.select(rest.tolist()), train.select(val.tolist())
    tables["train"] = train
    for key in ("train", "val", "test"):
        if len(tables[key]) == 0:
            raise UserError(f"Hugging Face dataset {where!r}: its {key} split holds no images (train has "
                            f"{len(source[chosen['train']])} rows; at least 10 are needed to hold out a split)")
    feature = datasets.Image(mode=None)  # decodes {bytes, path} values; EXIF orientation applied
    probe = {k: HFImages(tables[k], column, feature, 1) for k in ("train", "val", "test")}
    side = size or own_size(probe)
    parts = {k: HFImages(tables[k], column, feature, side) for k in ("train", "val", "test")}
    in_memory = sum(len(p) for p in parts.values()) * 3 * side * side <= IN_MEMORY_BYTES
    info = {
        "source": "huggingface",
        "id": name,
        "local_path": str(local.resolve()) if local is not None else None,
        "config": config,
        "image_column": column,
        "splits": {k: v if v is not None else f"{chosen['train']} (seeded hold-out)" for k, v in chosen.items()},
        "rows": {k: len(p) for k, p in parts.items()},
        "image_size": side,
        "in_memory": in_memory,
        "fingerprint": fingerprint(parts),
        "hf_fingerprints": {s: getattr(source[s], "_fingerprint", None) for s in chosen.values() if s is not None},
        "datasets_version": datasets.__version__,
    }
    label = f"hf@{side}:{path}" if size else f"hf:{path}"
    if in_memory:
        return ImageSplits(label, *(parts[k].materialize() for k in ("train", "val", "test")), info=info)
    return ImageSplits(label, parts["train"], parts["val"], parts["test"], info=info)
