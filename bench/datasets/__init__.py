"""Datasets as uint8 image tensors, and seeded index streams that batch them.

Small datasets live as one uint8 tensor (N, 3, H, W) on the training device; a batch is `images[indices]`,
so the training loop does no per-sample Python work. Large sets are streamed from disk instead (`ImageFiles`:
decoded on demand by a thread pool, never held whole). Every loader reads the on-disk format itself:
torchvision's classes are only used to download (`--download`), since they insist on checksums of the full files.

    catalog.py   the one table of datasets (DATASETS), --dataset name parsing, load_dataset
    common.py    ImageSplits, the data root, the seeded validation hold-out, the errors that say how to get files
    photos.py    `photos` (the default, offline): patches of scikit-image's photographs
    cifar.py     `cifar10`: the python pickles
    idx.py       `mnist`, `fashion-mnist`: the idx ubyte files
    svhn.py      `svhn`: the .mat files
    files.py     image files streamed from disk: ImageFiles, its thread pools, resizing, splits by name hashing,
                 the split fingerprint, the readability check before training
    celeba.py    `celeba[@SIZE]`: torchvision's layout, streamed
    folders.py   `imagefolder[@SIZE]:PATH` (FFHQ, ImageNet, any folder of images), streamed
    hf.py        `hf[@SIZE]:NAME[:COLUMN]`: Hugging Face datasets (Hub ids, save_to_disk, parquet folders)
    streams.py   IndexStream: seeded batches of indices
"""
from bench.datasets.catalog import DATASETS, DatasetInfo, DatasetName, image_size, list_datasets, load_dataset, parse_dataset
from bench.datasets.common import ImageSplits, default_data_root
from bench.datasets.files import ImageFiles, check_readable
from bench.datasets.streams import IndexStream

__all__ = ["DATASETS", "DatasetInfo", "DatasetName", "ImageFiles", "ImageSplits", "IndexStream", "check_readable",
           "default_data_root", "image_size", "list_datasets", "load_dataset", "parse_dataset"]
