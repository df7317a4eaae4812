"""The final evaluation end to end: rFID, KID, gFID and the prior's bits through a Trainer, LPIPS null offline."""
import json

import pytest

from bench.inception import random_extractor
from bench.train import Trainer
from tests.conftest import tiny_spec

TINY_PRIOR = {"layers": 1, "heads": 2, "width": 32, "steps": 5, "batch_size": 32, "warmup_steps": 1, "samples": 40}


@pytest.fixture
def isolated_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("VQBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no VGG16 there: LPIPS must say why it is null


@pytest.fixture
def random_inception(monkeypatch):
    """A random-weight feature network in place of the FID Inception: fast; the record names it "not FID"."""
    monkeypatch.setattr("bench.evaluation.fid_extractor", lambda spec, device: (random_extractor(seed=0), None))


def test_record_carries_rfid_kid_gfid_and_prior_bits(tmp_path, isolated_caches, random_inception, capsys):
    spec = tiny_spec(steps=4, fid=True, gfid=True, prior_options=TINY_PRIOR)
    trainer = Trainer(spec, tmp_path / "out", tmp_path / "runs", progress=False)
    record = json.loads(trainer().read_text())
    metrics, reasons, env = record["metrics"], record["null_reasons"], record["env"]
    for name in ("rfid", "kid", "gfid", "prior_bits_per_code"):
        assert metrics[name] is not None and metrics[name] == metrics[name], name
    assert metrics["rfid"] > 0 and metrics["gfid"] > 0
    assert 0 < metrics["prior_bits_per_code"] < 20
    assert env["fid_images"] == env["test_images"] == 961
    assert "not FID" in env["fid_weights_source"] and env["fid_weights_sha256"]
    assert env["gfid"]["fid_images"] == 40 and env["gfid"]["fid_reference_images"] == 4525
    assert metrics["lpips"] is None and "LPIPS" in reasons["lpips"]
    assert set(reasons) == {"lpips"}
    said = capsys.readouterr().out  # evaluation says what it does
    assert "evaluating: test split 961 images" in said
    assert "FID reference (once): Inception features of the 961 images of photos/test" in said
    assert "FID reference (once): Inception features of the 4525 images of photos/train" in said
    assert "stage-2 prior:" in said


def test_reference_statistics_are_cached_across_runs(tmp_path, isolated_caches, random_inception, capsys):
    infos = []
    for seed in (0, 1):
        trainer = Trainer(tiny_spec(steps=2, seed=seed, fid=True), tmp_path / "out", tmp_path / "runs", progress=False)
        infos.append(json.loads(trainer().read_text())["env"])
    assert infos[0]["reference_cached"] is False and infos[1]["reference_cached"] is True
    assert capsys.readouterr().out.count("FID reference (once)") == 1


def test_fid_off_is_null_with_reason(tmp_path):
    record = json.loads(Trainer(tiny_spec(steps=2), tmp_path / "out", tmp_path / "runs", progress=False)().read_text())
    assert record["metrics"]["rfid"] is None and "fid = false" in record["null_reasons"]["rfid"]
    assert record["metrics"]["gfid"] is None and "--gfid" in record["null_reasons"]["gfid"]
