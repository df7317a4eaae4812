"""--log tensorboard / wandb: live views whose numbers are the record's; a missing package is one line, early."""
import json
import math

import pytest

from bench.run import main
from tests.conftest import TINY


def run(dirs, *extra):
    return main(["--methods", "ste", "--steps", "6", "--eval-every", "3", *TINY, "--out", str(dirs["out"]),
                 "--scratch", str(dirs["scratch"]), "--quiet", *extra])


def only_record(out):
    (path,) = list(out.rglob("*.json"))
    return json.loads(path.read_text())


def test_tensorboard_scalars_are_the_records_curves(dirs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert run(dirs, "--log", "tensorboard") == 0
    record = only_record(dirs["out"])
    (events,) = {p.parent for p in dirs["scratch"].rglob("events.out.tfevents.*")}
    assert events.name == record["run_id"] and events.parent.name == "tensorboard"
    board = EventAccumulator(str(events))
    board.Reload()
    for key in ("mse", "perplexity", "usage"):
        logged = [(e.step, e.value) for e in board.Scalars(f"val/{key}")]
        assert [s for s, _ in logged] == [c["step"] for c in record["curves"]] == [3, 6]
        assert [v for _, v in logged] == pytest.approx([c[key] for c in record["curves"]], rel=1e-6)  # float32
    assert board.Scalars("test/mse")[0].value == pytest.approx(record["metrics"]["mse"], rel=1e-6)
    losses = board.Scalars("train/loss")
    assert [e.step for e in losses] == [3, 6] and all(e.value > 0 for e in losses)
    lr = {e.step: e.value for e in board.Scalars("train/lr")}
    # the rate the 6th step (index 5) used: warm-up of 2 steps, then cosine over the remaining 4
    assert lr[6] == pytest.approx(2e-4 * 0.5 * (1 + math.cos(math.pi * 3 / 4)), rel=1e-6)
    assert "test/reconstructions" in board.Tags()["images"]


def wandb_records(path):
    """The protobuf records of an offline W&B run file (a LevelDB-style log: a 7-byte header, then 32 KiB blocks of
    chunks, each with a 7-byte header: checksum, little-endian length, type 1 full / 2 first / 3 middle / 4 last)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, block, pending, records = 7, 32768, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_run_holds_the_config_and_the_summary(dirs, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert run(dirs, "--log", "wandb") == 0
    record = only_record(dirs["out"])
    (run_file,) = list(dirs["scratch"].rglob(f"offline-run-*-{record['run_id']}/*.wandb"))
    records = wandb_records(run_file)
    (header,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert header.run_id == header.display_name == record["run_id"] and header.run_group == record["experiment"]
    config = {u.key: json.loads(u.value_json) for u in header.config.update}
    assert {k: config[k] for k in record["spec"]} == record["spec"]
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({u.key: json.loads(u.value_json) for u in r.summary.update if u.key})
    assert summary["test/mse"] == pytest.approx(record["metrics"]["mse"])
    assert summary["test/perplexity"] == pytest.approx(record["metrics"]["perplexity"])


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb"])
def test_a_missing_package_is_one_line_before_training(tracker, dirs, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == tracker else real(name, *a))
    assert run(dirs, "--log", tracker) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"--log {tracker} needs the {tracker} package" in err and ".[track]" in err
    assert not list(dirs["out"].rglob("*.json")) and not list(dirs["scratch"].rglob("*.pt"))


def test_an_unknown_tracker_is_refused(dirs, capsys):
    assert run(dirs, "--log", "tensorbored") == 2
    assert "unknown --log 'tensorbored'" in capsys.readouterr().err
