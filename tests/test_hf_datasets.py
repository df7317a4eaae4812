"""`--dataset hf[@SIZE]:NAME[:COLUMN]`: tiny Hugging Face datasets built on disk (save_to_disk, a parquet repo
layout, a Hub id in a temporary Hugging Face cache), loaded offline, pixel for pixel."""
import json
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from bench import UserError
from bench.datasets import load_dataset
from bench.datasets.common import VAL_SEED, hold_out_validation
from bench.datasets.files import resize_center_crop
from bench.run import main
from tests.conftest import TINY, run_cli

datasets = pytest.importorskip("datasets", reason='the Hugging Face `datasets` package is not installed: '
                                                  'pip install -e ".[dev]" installs it')

TRAIN_ROWS, TEST_ROWS = 60, 12


@pytest.fixture(autouse=True)
def offline_hf_cache(tmp_path, monkeypatch):
    """A temporary Hugging Face cache, offline: nothing is read from or written to the user's own cache."""
    home = tmp_path / "hf-home"
    for name, value in {"HF_HOME": home, "HF_DATASETS_CACHE": home / "datasets", "HF_HUB_CACHE": home / "hub",
                        "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(name, str(value))
    # `datasets` reads these once, at import: in this process, patched too (subprocesses read the variables)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    datasets.disable_progress_bars()
    yield home
    datasets.enable_progress_bars()


def pixels(n: int, seed: int, size=(32, 32)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size[1], size[0], 3), dtype=np.uint8)


def as_chw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def image_split(images, key="img"):
    """A datasets.Dataset with a label column first and the images (PNG-encoded, an Image feature) second."""
    features = datasets.Features({"label": datasets.Value("int64"), key: datasets.Image()})
    return datasets.Dataset.from_dict({"label": list(range(len(images))), key: [Image.fromarray(a) for a in images]},
                                      features=features)


@pytest.fixture
def source():
    return {"train": pixels(TRAIN_ROWS, 1), "test": pixels(TEST_ROWS, 2)}


def save(folder, source, **extra):
    datasets.DatasetDict({name: image_split(images) for name, images in {**source, **extra}.items()}).save_to_disk(
        str(folder))
    return folder


def parquet_repo(folder, source):
    """A Hub repository's layout: data/SPLIT-00000-of-00001.parquet."""
    (folder / "data").mkdir(parents=True)
    for name, images in source.items():
        image_split(images).to_parquet(str(folder / "data" / f"{name}-00000-of-00001.parquet"))
    return folder


def test_saved_dataset_loads_offline_with_a_seeded_validation_split_pixel_for_pixel(tmp_path, source):
    splits = load_dataset(f"hf:{save(tmp_path / 'tiny', source)}")
    train, val = hold_out_validation(as_chw(source["train"]))  # CIFAR-10's rule: min(5,000, N / 10), fixed seed
    assert isinstance(splits.train, torch.Tensor) and splits.train.dtype == torch.uint8  # small: one tensor
    assert torch.equal(splits.train, train) and torch.equal(splits.val, val) and len(val) == TRAIN_ROWS // 10
    assert torch.equal(splits.test, as_chw(source["test"]))
    info = splits.info
    assert info["id"] == str(tmp_path / "tiny") and info["image_column"] == "img" and info["image_size"] == 32
    assert info["splits"] == {"train": "train", "val": "train (seeded hold-out)", "test": "test"}
    assert info["rows"] == {"train": TRAIN_ROWS - TRAIN_ROWS // 10, "val": TRAIN_ROWS // 10, "test": TEST_ROWS}
    assert len(info["fingerprint"]) == 64 and set(info["hf_fingerprints"]) == {"train", "test"}
    assert splits.to(torch.device("cpu")).info == info


def test_parquet_repo_layout_named_column_and_data_root_give_the_same_images_and_fingerprint(tmp_path, source):
    saved = load_dataset(f"hf:{save(tmp_path / 'tiny', source)}")
    parquet_repo(tmp_path / "root" / "tiny-pq", source)
    named = load_dataset("hf:tiny-pq:img", tmp_path / "root")  # a relative NAME is looked up under --data-root
    assert named.info["local_path"] == str(tmp_path / "root" / "tiny-pq")
    for a, b in zip((saved.train, saved.val, saved.test), (named.train, named.val, named.test)):
        assert torch.equal(a, b)
    assert named.info["fingerprint"] == saved.info["fingerprint"]  # content, not where or how it is stored
    changed = dict(source, test=source["test"].copy())
    changed["test"][-1, 0, 0, 0] ^= 1
    assert load_dataset(f"hf:{save(tmp_path / 'other', changed)}").info["fingerprint"] != saved.info["fingerprint"]


def test_split_names(tmp_path, source):
    extra = pixels(8, 3)
    three = load_dataset(f"hf:{save(tmp_path / 'a', source, valid=extra)}")  # train / valid / test: used as they are
    assert torch.equal(three.val, as_chw(extra)) and torch.equal(three.train, as_chw(source["train"]))
    assert three.info["splits"] == {"train": "train", "val": "valid", "test": "test"}

    # train + validation (ImageNet's layout): validation is the test split, the validation split comes out of train
    two = load_dataset(f"hf:{save(tmp_path / 'b', {'train': source['train'], 'validation': extra})}")
    assert torch.equal(two.test, as_chw(extra)) and two.info["splits"]["val"] == "train (seeded hold-out)"

    # train only: test, then validation, held out by fixed seeds; disjoint, and together the whole train split
    one = load_dataset(f"hf:{save(tmp_path / 'c', {'train': source['train']})}")
    rest, test = hold_out_validation(as_chw(source["train"]), seed=VAL_SEED + 1)
    train, val = hold_out_validation(rest)
    assert torch.equal(one.test, test) and torch.equal(one.val, val) and torch.equal(one.train, train)
    rows = {bytes(x.numpy()) for x in torch.cat([one.train, one.val, one.test])}
    assert len(rows) == TRAIN_ROWS == len(one.train) + len(one.val) + len(one.test)


def test_images_of_other_sizes_and_modes_are_rgb_resized_and_centre_cropped(tmp_path):
    wide = [Image.fromarray(a) for a in pixels(20, 4, size=(40, 24))]
    gray = [Image.fromarray(a[..., 0], mode="L") for a in pixels(10, 5, size=(24, 40))]
    features = datasets.Features({"photo": datasets.Image()})
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"photo": wide}, features=features),
        "test": datasets.Dataset.from_dict({"photo": gray}, features=features),
    }).save_to_disk(str(tmp_path / "mixed"))
    splits = load_dataset(f"hf@16:{tmp_path / 'mixed'}")
    assert splits.name == f"hf@16:{tmp_path / 'mixed'}" and splits.info["image_size"] == 16
    expected = torch.from_numpy(np.stack([resize_center_crop(im.convert("RGB"), 16) for im in gray]))
    assert torch.equal(splits.test, expected) and torch.equal(splits.test[:, 0], splits.test[:, 2])
    assert splits.train.shape == (18, 3, 16, 16)
    # without @SIZE, images that are not square and equal become 256 x 256
    assert load_dataset(f"hf:{tmp_path / 'mixed'}").info["image_size"] == 256


def test_large_datasets_stream_and_index_like_the_tensor(tmp_path, source, monkeypatch):
    path = save(tmp_path / "tiny", source)
    in_memory = load_dataset(f"hf:{path}")
    monkeypatch.setattr("bench.datasets.hf.IN_MEMORY_BYTES", 0)
    streamed = load_dataset(f"hf:{path}")
    assert not isinstance(streamed.train, torch.Tensor) and streamed.info["in_memory"] is False
    assert streamed.train.shape == in_memory.train.shape and len(streamed.val) == len(in_memory.val)
    index = torch.tensor([5, 0, 40, 5])
    streamed.train.prefetch(index)
    assert torch.equal(streamed.train[index], in_memory.train[index])
    assert torch.equal(streamed.to(torch.device("cpu")).test[2:9], in_memory.test[2:9])
    assert torch.equal(streamed.val[3], in_memory.val[3])
    assert streamed.info["fingerprint"] == in_memory.info["fingerprint"]


def test_errors_name_the_fix(tmp_path, source, monkeypatch):
    path = save(tmp_path / "tiny", source)
    datasets.DatasetDict({"a": image_split(source["test"]), "b": image_split(source["test"])}).save_to_disk(
        str(tmp_path / "no-train"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"x": [1, 2]})}).save_to_disk(str(tmp_path / "no-img"))
    cases = {
        "hf": "Hugging Face Hub id or a local dataset directory",
        f"hf:{path}:nope": "has no column 'nope'; its columns: label, img",
        f"hf:{path}:label": "not images; image columns: img",
        f"hf:{tmp_path / 'no-img'}": "has no image column",
        f"hf:{tmp_path / 'no-train'}": "has no 'train' split (its splits: a, b)",
        f"hf:{tmp_path / 'absent'}": "does not exist",
        "hf:uoft-cs/cifar10@64": "write --dataset hf@64:uoft-cs/cifar10",
        "hf@0:x": "positive integer",
        "hf:vqbench/absent": "offline mode is on and the Hugging Face cache",  # not in the cache, offline
    }
    for name, message in cases.items():
        with pytest.raises(UserError) as caught:
            load_dataset(name)
        assert message in str(caught.value), name
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if it were not installed
    with pytest.raises(UserError, match=r'pip install -e "\.\[hf\]"'):
        load_dataset(f"hf:{path}")


def test_missing_datasets_package_is_one_line_before_training(tmp_path, source, monkeypatch, dirs, capsys):
    path = save(tmp_path / "tiny", source)
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "datasets", None)
    code = main(["--methods", "ste", "--steps", "3", *TINY, "--dataset", f"hf:{path}", "--out", str(dirs["out"]),
                 "--scratch", str(dirs["scratch"]), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and "pip install" in err
    assert not dirs["out"].exists() or not list(dirs["out"].rglob("*.json"))


def hub_cache(home, repo_id, folder):
    """What `load_dataset(repo_id)` leaves in HF_DATASETS_CACHE when it ran online: the prepared Arrow files under
    OWNER___NAME/CONFIG/VERSION/HASH/. Made here by loading a local copy named like the repository, then renaming."""
    owner, name = repo_id.split("/")
    local = shutil.copytree(folder, home.parent / name)
    datasets.load_dataset(str(local))
    (home / "datasets" / name).rename(home / "datasets" / f"{owner}___{name}")
    shutil.rmtree(local)


def test_hub_id_trains_offline_from_the_hugging_face_cache_and_the_record_names_it(tmp_path, source, dirs,
                                                                                 offline_hf_cache):
    fingerprint = load_dataset(f"hf:{parquet_repo(tmp_path / 'repo', source)}").info["fingerprint"]
    hub_cache(offline_hf_cache, "vqbench/tiny-set", tmp_path / "repo")
    result = run_cli("--dataset", "hf:vqbench/tiny-set", "--methods", "ste", "--steps", "3", *TINY, "--out",
                     str(dirs["out"]), "--scratch", str(dirs["scratch"]), "--quiet", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (record_path,) = dirs["out"].rglob("*.json")
    record = json.loads(record_path.read_text())
    assert record["spec"]["dataset"] == "hf:vqbench/tiny-set" and record["metrics"]["mse"] > 0
    if "data" not in record["env"]:
        pytest.skip("the record does not carry ImageSplits.info (env.data: dataset id, fingerprint) yet: bench/train.py")
    assert record["env"]["data"]["fingerprint"] == fingerprint and record["env"]["data"]["id"] == "vqbench/tiny-set"
