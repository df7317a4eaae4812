import pickle

import numpy as np
import pytest
import torch

from bench import UserError
from bench.datasets import IndexStream, load_dataset
from bench.datasets.cifar import CIFAR_DIR, load_cifar10
from bench.datasets.photos import load_photos


def write_fake_cifar(root, per_batch=20, seed=0):
    """A tiny CIFAR-10 in the exact on-disk python format: pickled dicts with uint8 `data` rows (R, G, B planes)."""
    rng = np.random.default_rng(seed)
    folder = root / CIFAR_DIR
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        batch = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, per_batch).tolist(), b"data": data,
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
        batches[name] = data
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"airplane"] * 10, b"num_cases_per_batch": per_batch}, f)
    return batches


def test_cifar10_reads_the_python_format_pixel_for_pixel(tmp_path):
    batches = write_fake_cifar(tmp_path)
    splits = load_cifar10(tmp_path)
    assert splits.train.dtype == torch.uint8 and splits.train.shape[1:] == (3, 32, 32)
    assert len(splits.train) + len(splits.val) == 100 and len(splits.test) == 20
    row = batches["test_batch"][3]
    # the row holds 1024 red values, then green, then blue, each a row-major 32x32 plane
    assert splits.test[3, 0, 0, 1].item() == row[1]
    assert splits.test[3, 1, 2, 0].item() == row[1024 + 64]
    assert splits.test[3, 2, 31, 31].item() == row[3071]


def test_cifar10_validation_split_is_fixed_and_disjoint_from_training(tmp_path):
    write_fake_cifar(tmp_path)
    a, b = load_cifar10(tmp_path), load_cifar10(tmp_path)
    assert torch.equal(a.val, b.val) and torch.equal(a.train, b.train)
    train_rows = {bytes(x.numpy()) for x in a.train.flatten(1)}
    assert not any(bytes(x.numpy()) in train_rows for x in a.val.flatten(1))


def test_missing_cifar10_names_data_root_and_download(tmp_path):
    with pytest.raises(UserError) as error:
        load_dataset("cifar10", tmp_path)
    assert "--data-root" in str(error.value) and "--download" in str(error.value)


def test_photos_are_deterministic_and_sized_as_documented():
    a, b = load_photos(), load_photos()
    assert torch.equal(a.train, b.train) and torch.equal(a.test, b.test)
    assert (len(a.train), len(a.val), len(a.test)) == (4525, 504, 961)
    assert a.train.dtype == torch.uint8 and a.train.shape[1:] == (3, 32, 32)
    assert a.test.float().std() > 20  # real photographs, not a blank tensor


def test_index_stream_is_a_pure_function_of_seed_stream_and_position():
    stream = IndexStream(100, 32, seed=3, stream=0)
    first_epoch = torch.cat([stream(p) for p in range(3)])
    assert len(set(first_epoch.tolist())) == 96  # no index twice within an epoch
    fresh = IndexStream(100, 32, seed=3, stream=0)
    assert torch.equal(fresh(4), stream(4)) and torch.equal(fresh(1), stream(1))
    assert not torch.equal(IndexStream(100, 32, seed=3, stream=1)(0), stream(0))
    assert not torch.equal(IndexStream(100, 32, seed=4, stream=0)(0), stream(0))
