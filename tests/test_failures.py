"""Runs that fail safely (issue 14): a diverged run is a result, a second process on a run waits for the first,
Ctrl-C leaves nothing half-done, a resumed run refuses other images, files are readable by others, and a
damaged record stops a report instead of vanishing from its means."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bench import UserError
from bench.records import atomic_file, write_record
from bench.train import Trainer
from tests.conftest import ROOT, tiny_spec
from tests.test_cli import cli_args, files_under, image_folder, strict_json


# --- divergence ---------------------------------------------------------------------------------------------

def test_a_non_finite_loss_is_found_at_the_next_sync_and_never_checkpointed(tmp_path, one_thread, monkeypatch):
    """From step 7 on the loss reads NaN; eval and checkpoints every 3 steps: the NaN is found at step 9, before
    its validation and checkpoint, so the curves and the checkpoint stop at step 6."""
    import torch

    import methods.base

    honest = methods.base.standard_step

    def nan_from_step_7(ctx, images):
        result = honest(ctx, images)
        return methods.base.StepResult(result.loss * float("nan") if ctx.step >= 6 else result.loss, result.output)

    monkeypatch.setattr(methods.base, "standard_step", nan_from_step_7)
    spec = tiny_spec(steps=30, eval_every=3, ckpt_every=3, device="cpu")
    trainer = Trainer(spec, tmp_path / "out", tmp_path / "runs", progress=False, keep_checkpoints=True)
    record = strict_json(trainer())
    assert record["status"] == "diverged"
    assert record["divergence"] == {"step": 7, "last_finite_loss": record["divergence"]["last_finite_loss"],
                                    "stopped_at_step": 9, "steps": 30}
    assert 0 < record["divergence"]["last_finite_loss"] < 1
    assert [point["step"] for point in record["curves"]] == [3, 6]
    assert torch.load(trainer.checkpoint_path, weights_only=False)["step"] == 6
    assert not trainer.samples_path.exists()  # nothing to show of a diverged model


# --- one process per run ----------------------------------------------------------------------------------------

def test_two_processes_on_the_same_run_end_with_one_intact_record(dirs):
    args = ["--methods", "ste", "--steps", "40", "--ckpt-every", "5", "--eval-every", "10", *cli_args(dirs)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    processes = [subprocess.Popen([sys.executable, "-m", "bench.run", *args], cwd=ROOT, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, err
    (record,) = list(dirs["out"].rglob("*.json"))
    assert strict_json(record)["status"] == "complete" and strict_json(record)["cost"]["resumes"] == 0
    said = "".join(out for out, _ in outputs)
    assert "already running" in said or "skip (record exists)" in said  # the second waited, or came after
    assert files_under(dirs["scratch"]) == []
    assert sorted(p.name for p in record.parent.iterdir()) == sorted([record.name, record.stem + ".samples.npz"])


def test_a_lock_left_by_a_dead_process_is_no_lock(tmp_path, one_thread):
    trainer = Trainer(tiny_spec(steps=2), tmp_path / "out", tmp_path / "runs", progress=False)
    trainer.lock_path.parent.mkdir(parents=True)
    trainer.lock_path.write_text("pid 999999 on a-host-that-died\n")  # a file, but nobody holds a lock on it
    assert strict_json(trainer())["status"] == "complete"
    assert not trainer.lock_path.exists()


def test_temporary_files_have_unique_names_and_others_can_read_the_result(tmp_path):
    target = tmp_path / "f.bin"
    with atomic_file(target) as first, atomic_file(target) as second:  # two writers of one path
        assert first.name != second.name
        first.write(b"first")
        second.write(b"second")
    assert target.read_bytes() == b"first" and files_under(tmp_path) == ["f.bin"]  # the last to finish wins, whole
    old = os.umask(0o027)
    try:
        write_record(tmp_path / "r.json", {k: {} for k in ("experiment", "spec", "metrics", "cost", "null_reasons",
                                                            "curves", "env")})
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o640  # 0666 minus the umask, as open() makes it


# --- Ctrl-C -----------------------------------------------------------------------------------------------------

def test_ctrl_c_saves_nothing_half_done_says_how_to_resume_and_exits_130(dirs):
    args = ["--methods", "ste", "--steps", "100000", "--ckpt-every", "5", "--eval-every", "0", *cli_args(dirs)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "bench.run", *args], cwd=ROOT, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not list(dirs["scratch"].rglob("checkpoint.pt")):
        assert process.poll() is None, process.communicate()[1]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted at step ") and "; rerun the same command to resume (" in last
    assert "its last checkpoint" in last
    assert records_in(dirs["out"]) == []
    (checkpoint,) = files_under(dirs["scratch"])  # no lock, no temporary: only the last whole checkpoint
    assert checkpoint.endswith("checkpoint.pt")


def records_in(out):
    return list(out.rglob("*.json")) if out.exists() else []


# --- the split of a folder dataset is fixed by its file list ----------------------------------------------------

def test_a_run_resumed_onto_another_file_list_is_refused(tmp_path, one_thread):
    folder = image_folder(tmp_path)
    spec = tiny_spec(dataset=f"imagefolder@32:{folder}", batch_size=8, steps=4, ckpt_every=2, eval_every=0)
    with Trainer(spec, tmp_path / "out", tmp_path / "runs", progress=False) as first:
        first.setup()
        first.train(2)  # checkpointed at step 2, as a killed run leaves it
        fingerprint = first.data_fingerprint
    (folder / "007.png").unlink()  # e.g. a corrupt image deleted: the hashed split moves
    with pytest.raises(UserError, match="changed since run .* was checkpointed .*cannot resume"):
        Trainer(spec, tmp_path / "out", tmp_path / "runs", progress=False)()
    first.checkpoint_path.unlink()  # started over on the new list, the record names its fingerprint
    record = strict_json(Trainer(spec, tmp_path / "out", tmp_path / "runs", progress=False)())
    assert record["env"]["data"]["fingerprint"] not in (None, fingerprint)
    assert record["env"]["data"]["files"] == {"train": 33, "val": 2, "test": 4}


# --- checkpoints and torch's settings after a run ---------------------------------------------------------------

def test_the_final_checkpoint_is_removed_unless_kept(tmp_path, one_thread):
    kept = Trainer(tiny_spec(steps=2), tmp_path / "a", tmp_path / "a-runs", progress=False, keep_checkpoints=True)
    kept()
    assert kept.checkpoint_path.is_file()
    removed = Trainer(tiny_spec(steps=2), tmp_path / "b", tmp_path / "b-runs", progress=False)
    removed()
    assert removed.record_path.is_file() and files_under(tmp_path / "b-runs") == []


def test_torch_settings_are_the_runs_own_even_when_it_fails(tmp_path):
    import torch

    torch.use_deterministic_algorithms(False)
    threads = torch.get_num_threads()
    spec = tiny_spec(steps=2, threads=1, device="cpu")
    Trainer(spec, tmp_path / "out", tmp_path / "runs", progress=False)()
    assert not torch.are_deterministic_algorithms_enabled() and torch.get_num_threads() == threads
    broken = Trainer(tiny_spec(steps=3, threads=1, device="cpu"), tmp_path / "out", tmp_path / "runs", progress=False)
    broken.checkpoint_path.parent.mkdir(parents=True)
    broken.checkpoint_path.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="corrupt"):
        broken()
    assert not torch.are_deterministic_algorithms_enabled() and torch.get_num_threads() == threads


# --- reports: a diverged run is shown, a damaged record stops the report ----------------------------------------

def diverge(path, step):
    """Turn a record written by tests/test_report.py's write_run into a diverged run's record."""
    record = json.loads(path.read_text())
    reason = "training diverged (a non-finite training loss; the record's divergence says where): not evaluated"
    record.update(status="diverged", divergence={"step": step, "last_finite_loss": 0.5, "stopped_at_step": step + 3,
                                                 "steps": 20},
                  metrics=dict.fromkeys(record["metrics"]), null_reasons=dict.fromkeys(record["metrics"], reason),
                  curves=record["curves"][:1])
    write_record(path, record)
    path.with_suffix(".samples.npz").unlink()


@pytest.fixture
def grid_with_diverged_runs(tmp_path):
    """ste and a over seeds 0-2, and b over seeds 0-1: a's seed 1 diverged at step 7, both of b's at 3 and 5."""
    from tests.test_report import write_run

    for seed in range(3):
        write_run(tmp_path, "ste", seed, metrics={"mse": 0.30 + seed / 100})
        path = write_run(tmp_path, "a", seed, metrics={"mse": 0.10 + seed / 100})
        if seed == 1:
            diverge(path, 7)
    for seed, step in ((0, 3), (1, 5)):
        diverge(write_run(tmp_path, "b", seed), step)
    return tmp_path


def test_diverged_runs_stay_in_the_tables_and_the_paired_comparison_counts_them(grid_with_diverged_runs, capsys):
    from bench.report import main

    assert main([str(grid_with_diverged_runs), "--no-figures", "--reference", "ste"]) == 0
    report = capsys.readouterr().out
    quality = report[report.index("quality"):report.index("cost")]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in quality.splitlines() if line.startswith("| ") and "method" not in line}
    assert rows["a"][:3] == ["3", "1 (step 7)", "**0.11000 ± 0.01414 (n=2)**"]  # seeds 0 and 2: 0.10, 0.12; best
    assert rows["b"][:3] == ["2", "2 (steps 3, 5)", "diverged"]
    assert rows["ste"][:3] == ["3", "0", "0.31000 ± 0.01000"]
    assert "diverged seeds, left out of the pairs: a: 1 of 3 (step 7); b: 2 of 2 (steps 3, 5)" in report
    (pair,) = [[c.strip() for c in line.split("|")[1:-1]] for line in report.splitlines()
               if line.startswith("| MSE ") and "| a " in line]
    assert pair[2] == "**-0.200000**" and pair[4] == "2"  # a's seeds 0 and 2 against ste's, paired


def test_equal_compute_leaves_diverged_runs_out(grid_with_diverged_runs, capsys):
    from bench.report import main

    assert main([str(grid_with_diverged_runs), "--no-figures"]) == 0
    report = capsys.readouterr().out
    assert "diverged runs left out (of a, b): their curves stop where they diverged" in report
    assert "T = 10.00 s" in report  # not the 5 s of the diverged runs' one-point curves


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_damaged_record_next_to_good_ones_stops_the_report(grid_with_diverged_runs, damage, capsys):
    from bench.report import main

    (victim, *_) = sorted(grid_with_diverged_runs.rglob("ste-*.json"))
    text = victim.read_text()
    victim.write_text(text[:len(text) // 2] if damage == "truncated" else "")
    assert main([str(grid_with_diverged_runs), "--no-figures"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: 1 damaged record(s) under {grid_with_diverged_runs}: {victim} (") and "\n" not in err
    assert ("empty" if damage == "empty" else "truncated") in err and "delete each and rerun its command" in err
