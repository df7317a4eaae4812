"""The batch streams (bench.datasets.IndexStream) and the run record (bench.records), each against its definition."""
from __future__ import annotations

import json
import math

import pytest
import torch

from bench import UserError
from bench.datasets import IndexStream
from bench.records import RECORD_KEYS, load_records, read_records, write_atomic, write_record
from bench.train import EXTRA_STREAM, TRAIN_STREAM


# --- IndexStream ----------------------------------------------------------------------------------------------

def test_a_batch_is_a_slice_of_its_epochs_seeded_permutation():
    """Golden value (the seed formula is the stream's identity: changing it changes every run's batches):
    batch p = randperm(size, seed 1_000_003 s + 7_919 t + epoch)[slot B:(slot + 1) B],
    (epoch, slot) = divmod(p, size // B)."""
    size, b = 100, 32  # three batches per epoch, 4 images left out of each epoch
    for seed, stream in [(0, 0), (3, 1), (7, 2)]:
        indices = IndexStream(size, b, seed, stream)
        for position in range(8):
            epoch, slot = position // 3, position % 3
            order = torch.randperm(size, generator=torch.Generator().manual_seed(seed * 1_000_003 + stream * 7_919
                                                                                + epoch))
            assert torch.equal(indices(position), order[slot * b:(slot + 1) * b]), (seed, stream, position)


def test_each_epoch_visits_distinct_images_drops_the_remainder_and_reshuffles():
    size, b = 100, 32
    stream = IndexStream(size, b, seed=1, stream=TRAIN_STREAM)
    epochs = [torch.cat([stream(3 * e + slot) for slot in range(3)]) for e in range(3)]
    for batch in (stream(p) for p in range(9)):
        assert batch.shape == (b,) and batch.dtype == torch.int64
        assert 0 <= int(batch.min()) and int(batch.max()) < size
    for epoch in epochs:
        assert len(set(epoch.tolist())) == 96  # no image twice in an epoch; the last incomplete batch dropped
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])  # a new order each epoch
    assert set(epochs[0].tolist()) != set(epochs[1].tolist())  # and so different left-out images


def test_a_batch_depends_only_on_seed_stream_and_position():
    stream = IndexStream(100, 32, seed=2, stream=0)
    visited = {p: stream(p) for p in (5, 0, 7, 1)}  # any order, back and forth across epochs
    for p, batch in visited.items():
        assert torch.equal(IndexStream(100, 32, seed=2, stream=0)(p), batch)
    assert TRAIN_STREAM != EXTRA_STREAM
    assert not torch.equal(IndexStream(100, 32, 2, TRAIN_STREAM)(0), IndexStream(100, 32, 2, EXTRA_STREAM)(0))
    assert not torch.equal(IndexStream(100, 32, 2, 0)(0), IndexStream(100, 32, 3, 0)(0))


def test_a_batch_larger_than_the_split_is_a_user_error():
    with pytest.raises(UserError, match="batch-size"):
        IndexStream(10, 32, 0, 0)
    assert IndexStream(32, 32, 0, 0)(1).shape == (32,)  # exactly one batch per epoch


# --- the record ----------------------------------------------------------------------------------------------

def record(run_id="r1", experiment="exp", mse=0.5, **extra):
    return {"experiment": experiment, "run_id": run_id,
            "spec": {"method": "ste", "seed": 0, "betas": [0.9, 0.99], "method_options": {"a": 1}},
            "metrics": {"mse": mse, "rfid": None}, "cost": {"wall_s": 1.5}, "null_reasons": {"rfid": "off"},
            "curves": [{"step": 2, "mse": 0.6}], "env": {"device": "cpu"}, **extra}


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp") or p.name.startswith("."))


def test_record_keys_are_the_documented_ones():
    assert set(RECORD_KEYS) == {"experiment", "spec", "metrics", "cost", "null_reasons", "curves", "env"}


def test_write_record_writes_the_whole_record_as_json(tmp_path):
    path = tmp_path / "exp" / "r1.json"
    write_record(path, record())
    assert json.loads(path.read_text()) == record()
    assert leftovers(path.parent) == []


@pytest.mark.parametrize("missing", RECORD_KEYS)
def test_a_record_without_a_key_is_refused_and_nothing_is_written(tmp_path, missing):
    incomplete = {k: v for k, v in record().items() if k != missing}
    with pytest.raises(ValueError, match=missing):
        write_record(tmp_path / "r.json", incomplete)
    assert not (tmp_path / "r.json").exists()


def test_a_non_finite_number_is_refused_and_the_previous_file_kept(tmp_path):
    path = tmp_path / "r.json"
    write_record(path, record())
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError):
            write_record(path, record(mse=bad))
    assert json.loads(path.read_text()) == record()
    assert leftovers(tmp_path) == []


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "f.txt"
    write_atomic(path, "old")
    with pytest.raises(TypeError):
        write_atomic(path, 123)  # not text: fails mid-write
    assert path.read_text() == "old" and leftovers(tmp_path) == []


def test_read_records_finds_records_recursively_and_ignores_other_json(tmp_path):
    write_record(tmp_path / "b" / "r2.json", record("r2"))
    write_record(tmp_path / "a" / "deep" / "r1.json", record("r1"))
    (tmp_path / "a" / "notes.json").write_text(json.dumps({"experiment": "x"}))  # lacks the record keys
    (tmp_path / "a" / "list.json").write_text("[1, 2]")
    (tmp_path / "a" / "broken.json").write_text("{not json")
    found = read_records(tmp_path)
    assert [r["run_id"] for r in found] == ["r1", "r2"]  # sorted by path
    assert found[0]["_path"] == str(tmp_path / "a" / "deep" / "r1.json")
    with pytest.raises(UserError, match="not a directory"):
        read_records(tmp_path / "missing")


def test_load_records_has_one_row_per_run_and_prefixed_scalar_columns(tmp_path):
    write_record(tmp_path / "exp" / "r1.json", record("r1", mse=0.25))
    write_record(tmp_path / "exp" / "r2.json", record("r2", mse=0.75))
    frame = load_records(tmp_path)
    assert list(frame["run_id"]) == ["r1", "r2"] and list(frame["experiment"]) == ["exp", "exp"]
    assert list(frame["metrics.mse"]) == [0.25, 0.75] and list(frame["cost.wall_s"]) == [1.5, 1.5]
    assert list(frame["spec.method"]) == ["ste", "ste"] and "path" in frame
    assert "spec.betas" not in frame and "spec.method_options" not in frame  # lists and dicts stay in the JSON
    assert frame["metrics.rfid"].isna().all()
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no run records"):
        load_records(tmp_path / "empty")
