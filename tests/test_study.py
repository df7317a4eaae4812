"""Studies (bench/study.py): the grid a study file declares, equal-budget trials, selection on validation only.

The expansion is checked against counts and sets written out here from the study files' own words; selection
against a winner computed here from the records; and a tuning study run end to end with a test split that
raises on any read until the selection file exists.
"""
import itertools
import json
from pathlib import Path

import pytest

from bench import UserError
from bench.study import (LR_SPACE, Study, estimate_seconds, load_study, run_study, selection_path, study_dir,
                         write_study_report)
from methods import list_methods, method_options, search_space

ROOT = Path(__file__).resolve().parent.parent


def registered():
    """The suite's methods, without the registrations other tests add to this process (test-*)."""
    return [m for m in list_methods() if not m.startswith("test-")]
TINY_SETTINGS = """
[settings]
dataset = "photos"
steps = 3
batch_size = 16
width = 16
res_blocks = 1
res_width = 8
code_dim = 8
codebook_size = 32
warmup_steps = 1
eval_every = 0
ckpt_every = 0
eval_batch_size = 1000
fid = false
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def test_every_method_declares_a_search_space_of_its_own_options():
    for method in registered():
        space = search_space(method)
        assert space, f"{method} declares no search space"
        assert set(space) <= set(method_options(method)), method
        assert all(len(values) >= 2 for values in space.values()), method


def test_committed_study_files_expand_to_their_declared_grids():
    scaling = load_study(ROOT / "studies" / "scaling.toml")
    cells = scaling.cells()
    assert len(cells) == len(registered()) * 4 * 2  # every method, K = 256..16384, two seeds
    assert {c.spec.codebook_size for c in cells} == {256, 1024, 4096, 16384}
    assert {c.method for c in cells} == set(registered())
    assert len({c.spec.run_id() for c in cells}) == len(cells)  # no two cells are the same run

    ablations = load_study(ROOT / "studies" / "mq-ablations.toml")
    by_arm = {c.arm: c.spec for c in ablations.cells() if c.seed == 0}
    assert by_arm["mq (identity)"].method_options == {"hyper_net": "identity", "latent_dim": 64}
    assert by_arm["mq (jvp)"].method_options == {"hypergrad": "jvp"}
    assert by_arm["mq-alt"].method == "mq-alt" and by_arm["mq"].method_options == {}
    assert ablations.reference_arm == "mq"

    tuned = load_study(ROOT / "studies" / "tuned.toml")
    trials = tuned.cells()
    assert all(c.phase == "trial" and c.spec.eval_split == "val" for c in trials)
    assert len(trials) == len(registered()) * tuned.trials * len(tuned.trial_seeds)


def test_the_dry_run_estimate_uses_the_records_at_the_cells_codebook_size_where_there_are_any():
    scaling = load_study(ROOT / "studies" / "scaling.toml")
    cell = next(c for c in scaling.cells() if c.method == "ste" and c.spec.codebook_size == 4096)

    def record(k, per_step, eval_s, fid=False, method="ste", steps=100):
        return {"spec": {"method": method, "codebook_size": k, "steps": steps, "fid": fid},
                "cost": {"train_s": per_step * steps, "eval_s": eval_s}}

    done = [record(256, 0.1, 4.0), record(256, 0.1, 4.0), record(4096, 0.5, 6.0), record(4096, 0.7, 8.0, steps=50),
            record(4096, 0.6, 90.0, fid=True), record(4096, 9.0, 1.0, method="ema")]
    # median of 0.5, 0.7 and 0.6 s per step at K = 4096 (never the K = 256 or ema records); eval: non-fid median
    assert estimate_seconds(cell, done) == pytest.approx(0.6 * cell.spec.steps + 7.0)
    other_k = next(c for c in scaling.cells() if c.method == "ste" and c.spec.codebook_size == 1024)
    assert estimate_seconds(other_k, done) == pytest.approx(0.5 * other_k.spec.steps + 5.0)  # no K = 1024: all ste's
    assert estimate_seconds(next(c for c in scaling.cells() if c.method == "fsq"), done) is None


def test_trials_are_the_defaults_then_distinct_draws_from_the_declared_space(tmp_path):
    study = load_study(write(tmp_path, "t", 'kind = "tune"\ntrials = 5\nmethods = ["ema", "mq"]\n' + TINY_SETTINGS))
    for arm in study.arms:
        trials = study.trial_settings(arm)
        assert len(trials) == 5  # the same budget for every method
        assert trials[0] == ({}, {})  # trial 0: the method's defaults
        space = {"lr": LR_SPACE, **search_space(arm.method)}
        points = []
        for settings, options in trials[1:]:
            point = {**settings, **options}
            assert set(point) == set(space)
            assert all(point[k] in space[k] for k in space)
            points.append(json.dumps(point, sort_keys=True))
        assert len(set(points)) == len(points)  # without replacement
        default = {"lr": 2e-4, **{k: method_options(arm.method)[k] for k in search_space(arm.method)}}
        assert json.dumps(default, sort_keys=True) not in points  # the defaults are trial 0, not drawn again
        assert study.trial_settings(arm) == trials  # the same draw every time (seeded by study and arm)
    # a different study name draws differently (the seed is the study's, not a global one)
    other = load_study(write(tmp_path, "u", 'kind = "tune"\ntrials = 5\nmethods = ["ema"]\n' + TINY_SETTINGS))
    assert other.trial_settings(other.arms[0]) != study.trial_settings(study.arms[0])


def fake_trial_record(study: Study, cell, value, status="complete", split="val"):
    path = study_dir(study, study.path.parent / "out") / cell.spec.experiment / f"{cell.spec.run_id()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = {**cell.spec.to_dict(), "eval_split": split}
    path.write_text(json.dumps({"spec": spec, "status": status, "metrics": {"mse": value, "rfid": None}}))


def test_selection_takes_the_lowest_mean_validation_metric_and_ranks_a_diverged_trial_last(tmp_path):
    study = load_study(write(tmp_path, "sel", 'kind = "tune"\ntrials = 4\ntrial_seeds = [100, 101]\n'
                                              'methods = ["ste"]\n' + TINY_SETTINGS))
    # trial 2 has the lowest single value but diverged at its other seed: it ranks last, not first
    values = {0: (0.05, 0.07), 1: (0.04, 0.05), 2: (0.03, None), 3: (0.04, 0.045)}
    for cell in study.cells():
        value = values[cell.trial][cell.seed - 100]
        fake_trial_record(study, cell, value, status="diverged" if value is None else "complete")
    selection = study.select(study_dir(study, tmp_path / "out"))
    ste = selection["methods"]["ste"]
    means = {t: sum(v) / 2 for t, v in values.items() if None not in v}
    assert ste["winner"] == min(means, key=means.get) == 3
    assert [t["status"] for t in ste["trials"]] == ["complete", "complete", "diverged", "complete"]
    assert ste["trials"][2]["value"] is None
    assert selection["split"] == "val" and selection["metric"] == "mse"


def test_selection_refuses_a_trial_evaluated_on_the_test_split(tmp_path):
    study = load_study(write(tmp_path, "leak", 'kind = "tune"\ntrials = 2\nmethods = ["ste"]\n' + TINY_SETTINGS))
    for i, cell in enumerate(study.cells()):
        fake_trial_record(study, cell, 0.1 + i, split="test" if i == 1 else "val")
    with pytest.raises(UserError, match="test split"):
        study.select(study_dir(study, tmp_path / "out"))


@pytest.mark.parametrize("text, match", [
    ('kind = "tune"\nmethods = ["ste"]\n', "trials"),
    ('kind = "tune"\ntrials = 2\ntrial_seeds = [0]\nmethods = ["ste"]\n', "share"),
    ('kind = "grid"\nmethods = ["nope"]\n', "unknown method"),
    ('kind = "grid"\nmethods = ["ste"]\ncolour = 1\n', "unknown key"),
    ('kind = "grid"\nmethods = ["ste"]\n[method_options.ste]\nbeta = 1\n', "no option beta"),
    ('kind = "grid"\nmethods = ["ste"]\n[axes]\ncodebook_size = [0]\n', "codebook-size"),
])
def test_a_bad_study_file_is_one_clear_error_before_anything_runs(tmp_path, text, match):
    with pytest.raises(UserError, match=match):
        load_study(write(tmp_path, "bad", text))


class SplitGuard:
    """Stands in for the test split: any read before the selection file exists fails the test."""

    def __init__(self, real, selection: Path):
        self.real, self.selection = real, selection
        self.reads_after_selection = 0

    def _allowed(self):
        if not self.selection.is_file():
            raise AssertionError("the test split was read before the selection was made")
        self.reads_after_selection += 1
        return self.real

    def to(self, device):
        self.real = self.real.to(device)
        return self

    def __len__(self):
        return len(self._allowed())

    def __getitem__(self, index):
        return self._allowed()[index]

    def __getattr__(self, name):
        return getattr(self._allowed(), name)


def test_a_tuning_study_never_reads_the_test_split_before_selection(tmp_path, monkeypatch, one_thread):
    import bench.train
    from bench.datasets import load_dataset as real_load
    from bench.datasets.common import ImageSplits

    path = write(tmp_path, "guarded", 'kind = "tune"\ntrials = 2\nfinal_seeds = [0]\nmethods = ["ste", "ema"]\n'
                                      + TINY_SETTINGS)
    study = load_study(path)
    out = tmp_path / "results"
    guards = []

    def guarded(*args, **kwargs):
        data = real_load(*args, **kwargs)
        guards.append(SplitGuard(data.test, selection_path(study, out)))
        return ImageSplits(data.name, data.train, data.val, guards[-1], data.info)

    monkeypatch.setattr(bench.train, "load_dataset", guarded)
    monkeypatch.setattr("bench.study.write_study_report", lambda *a, **k: None)  # the report has its own tests
    assert run_study(study, out, tmp_path / "runs", "inline", {"quiet": True}) == 0
    selection = json.loads(selection_path(study, out).read_text())
    assert set(selection["methods"]) == {"ste", "ema"}
    trial_records = list((study_dir(study, out) / f"{study.name}-trials").glob("*.json"))
    assert len(trial_records) == 4
    for record in map(json.loads, (p.read_text() for p in trial_records)):
        assert record["spec"]["eval_split"] == "val"
        assert record["env"]["eval_split"] == "val" and record["env"]["val_images"] == len(real_load("photos").val)
    recorded = {p.stem: json.loads(p.read_text()) for p in (study_dir(study, out) / study.name).glob("*.json")}
    cells = study.cells(selection)
    final_ids = {c.spec.run_id() for c in cells if c.phase == "final"}
    default_ids = {c.spec.run_id() for c in cells if c.phase == "default"}
    assert len(final_ids) == 2 and set(recorded) == final_ids | default_ids  # a default that won is one run
    assert all(r["spec"]["eval_split"] == "test" and r["env"]["test_images"] > 0 for r in recorded.values())
    assert sum(g.reads_after_selection for g in guards) > 0  # the final runs did evaluate on the test split
    for run_id in final_ids:  # the winner's settings, on the final seed
        final = recorded[run_id]
        chosen = selection["methods"][final["spec"]["method"]]
        settings = chosen["trials"][chosen["winner"]]["settings"]
        assert final["spec"]["lr"] == settings.get("lr", 2e-4)
        for key, value in settings.items():
            if key.startswith("method."):
                assert final["spec"]["method_options"][key.removeprefix("method.")] == value


COMMITTED = sorted(path.stem for path in (ROOT / "studies").glob("*.toml")
                   if (ROOT / "results" / "studies" / path.stem / "report").is_dir())


@pytest.mark.parametrize("name", COMMITTED or [pytest.param(None, marks=pytest.mark.skip(
    reason="no committed study report under results/studies/ yet"))])
def test_a_committed_study_report_regenerates_byte_for_byte(name, tmp_path):
    committed = ROOT / "results" / "studies" / name / "report"
    write_study_report(load_study(ROOT / "studies" / f"{name}.toml"), ROOT / "results" / "studies", tmp_path)
    files = sorted(p.relative_to(committed) for p in committed.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    for relative in files:
        assert (tmp_path / relative).read_bytes() == (committed / relative).read_bytes(), relative
