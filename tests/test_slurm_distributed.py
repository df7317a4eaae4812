"""Data-parallel runs on a real SLURM cluster: one run as one job of 2 tasks (2 CPU ranks, gloo).

Marked `slurm`, like tests/test_slurm.py (whose cluster fixture and helpers this module uses): they need a cluster,
usually `slurm/local-cluster.sh`'s, and skip without one (fail under VQBENCH_REQUIRE_SLURM=1). One tiny run
(6 steps of a global batch of 8, a checkpoint at step 3, no rFID, one thread per rank) goes through
`--launcher slurm --ranks 2` as a job of 2 tasks (sbatch --ntasks-per-node=2) three times:
  - uninterrupted: its one record has the one-process record's metrics (1e-5 relative);
  - requeued with `scontrol requeue` at its checkpoint: both ranks start again, resume from the checkpoint and
    end with exactly the uninterrupted 2-task record's metrics (a rank that started over would not);
  - cancelled with `scancel` at its checkpoint: no process of the job (srun, the ranks) is left 30 s later, well
    within the collective timeout (VQB_COLLECTIVE_TIMEOUT_S), and rerunning the command resumes from the
    checkpoint, to the same record.
An interrupted run's first attempt holds after its first checkpoint (HeldTrainer) until SLURM stops it, so the
interruption lands mid-run on a fast machine and on a slow one alike, without a long run. The three jobs are
submitted at once; each takes the local cluster's 2 CPUs, so SLURM runs them one after another.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.train import Trainer
from tests.conftest import ROOT, TINY
from tests.test_slurm import background, cluster, dirs_args, grid, record, sacct_states  # noqa: F401 (fixtures)

STEPS, CKPT_EVERY, RANKS = 6, 3, 2
# The job's VQB_COLLECTIVE_TIMEOUT_S. Not small: a rank waits at a barrier while the other is slower (rank 0 alone
# writes checkpoints and the record and computes what evaluation does not shard), seconds on an idle machine and
# minutes on a busy one.
COLLECTIVE_TIMEOUT_S = 600
GONE_S = 30  # the cancelled job's processes must be gone this soon after scancel (SIGKILL after KillWait, 5 s)
RUN = ["--methods", "ema", "--steps", str(STEPS), "--ckpt-every", str(CKPT_EVERY), "--eval-every", "0", *TINY,
       "--batch-size", "8", "--set", "eval_batch_size=250", "--threads", "1", "--quiet"]
# 2 tasks of 1 CPU on one node: the whole of a 2-core node; 2 GB a rank
SLURM = ["--launcher", "slurm", "--slurm-preset", "local", "--nodes", "1", "--ranks", str(RANKS),
         "--cpus-per-task", "1", "--mem-gb", "4", "--time", "15"]
DEADLINE_S = 1800  # for one command to finish (its job may wait behind the two others)
HOLD_S = 600  # the longest a held first attempt waits for SLURM to stop it; then it goes on (and the test fails)
HELD = ["-c", "import sys; from tests.test_slurm_distributed import held_main; sys.exit(held_main(sys.argv[1:]))"]
ENV = {"VQB_COLLECTIVE_TIMEOUT_S": str(COLLECTIVE_TIMEOUT_S)}  # sbatch passes the environment on to the job


class HeldTrainer(Trainer):
    """A Trainer whose first attempt (no resume yet) holds, on every rank, once its first checkpoint is on disk
    (train() returns there after the barrier that follows the save: no collective is pending), for up to HOLD_S;
    a resumed attempt trains straight through. The steps and their numbers are the plain Trainer's."""

    def setup(self) -> None:
        super().setup()
        if self.resumes:  # in the rank's own log, ID_RANK_log.out
            print(f"rank {self.rank}: resumed from step {self.step} (resume {self.resumes})", flush=True)

    def train(self, until: int) -> None:
        if self.resumes == 0 and self.step < CKPT_EVERY <= until:
            super().train(CKPT_EVERY)
            print(f"rank {self.rank}: holding at step {self.step} (checkpoint on disk) until SLURM stops the job",
                  flush=True)
            deadline = time.monotonic() + HOLD_S
            while time.monotonic() < deadline:
                time.sleep(0.2)
        super().train(until)


def held_main(argv: list[str]) -> int:
    """`python -m bench.run ARGV` whose SLURM jobs run HeldTrainers (submitit pickles the class by reference)."""
    import bench.launch
    from bench.run import main

    bench.launch.Trainer = HeldTrainer
    return main(argv)


def job_processes(scratch: Path) -> list[str]:
    """The processes of a submitit job in this scratch folder: srun and the ranks (their command lines name the
    folder submitit/%j)."""
    folder = str(scratch.resolve() / "submitit")
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if folder in command:
            found.append(f"{proc.name}: {command[:200]}")
    return found


@pytest.fixture(scope="module")
def two_tasks(cluster, background, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("two-tasks")
    args = {name: [*RUN, *SLURM, *dirs_args(root / name)] for name in ("plain", "requeued", "cancelled")}
    (requeued,), (cancelled,), (plain,) = grid(args["requeued"]), grid(args["cancelled"]), grid(args["plain"])
    clis = {"plain": background(args["plain"], root / "plain-cli", env=ENV),
            "requeued": background(args["requeued"], root / "requeued-cli", entry=HELD, env=ENV),
            "cancelled": background(args["cancelled"], root / "cancelled-cli", entry=HELD, env=ENV)}

    # the one-process run, in this process meanwhile
    (single,) = grid([*RUN, *dirs_args(root / "single")])
    single_record = json.loads(Trainer(single.spec, single.out_dir, single.scratch_dir, progress=False)().read_text())

    found: dict = {}
    pending = {"requeued": requeued, "cancelled": cancelled}
    deadline = time.monotonic() + 2 * DEADLINE_S
    while pending:  # act on each held run once its checkpoint is on disk (the job holds there)
        assert time.monotonic() < deadline, f"no checkpoint of {', '.join(pending)} after {2 * DEADLINE_S} s"
        for name, trainer in list(pending.items()):
            cli = clis[name]
            assert cli.process.poll() is None, f"{name}: bench.run ended before the checkpoint:\n{cli.stdout}\n{cli.stderr}"
            if not trainer.checkpoint_path.exists():
                continue
            assert not trainer.record_path.exists(), f"{name} finished before it could be interrupted"
            (job,) = cli.job_ids().values()
            command = ["scontrol", "requeue", job] if name == "requeued" else ["scancel", job]
            answer = subprocess.run(command, capture_output=True, text=True, timeout=60)
            assert answer.returncode == 0, f"{' '.join(command)}: {answer.stderr}"
            del pending[name]
            if name == "cancelled":  # every process of the job must be gone soon, well within the collective timeout
                started = time.monotonic()
                while (left := job_processes(trainer.scratch_dir)) and time.monotonic() - started < GONE_S:
                    time.sleep(0.2)
                found["left_after_scancel"], found["gone_after_s"] = left, time.monotonic() - started
                found["cancelled_job"] = job
        time.sleep(0.2)

    codes = {name: cli.finish(DEADLINE_S) for name, cli in clis.items()}
    outputs = {name: cli.stdout + cli.stderr for name, cli in clis.items()}
    assert trainer_checkpoint_kept(cancelled), "the cancelled run's checkpoint is gone"
    rerun = background(args["cancelled"], root / "cancelled-rerun-cli", entry=HELD, env=ENV)
    codes["rerun"], outputs["rerun"] = rerun.finish(DEADLINE_S), rerun.stdout + rerun.stderr
    return {"codes": codes, "outputs": outputs, "jobs": {name: cli.job_ids() for name, cli in clis.items()},
            "single": single_record, "plain": plain, "requeued": requeued, "cancelled": cancelled, **found}


def trainer_checkpoint_kept(trainer: Trainer) -> bool:
    return trainer.checkpoint_path.exists() and not trainer.record_path.exists()


def assert_close_metrics(got: dict, expected: dict, rel: float) -> None:
    for name, value in expected["metrics"].items():
        if value is None:
            assert got["metrics"][name] is None, name
        else:
            assert got["metrics"][name] == pytest.approx(value, rel=rel), name


@pytest.mark.slurm
def test_a_two_task_job_writes_one_record_with_the_one_process_metrics(two_tasks):
    assert two_tasks["codes"]["plain"] == 0, two_tasks["outputs"]["plain"]
    assert "completed 1, failed 0, requeued and resumed 0" in two_tasks["outputs"]["plain"]
    plain = two_tasks["plain"]
    assert [p.name for p in plain.record_path.parent.glob("*.json")] == [plain.record_path.name]  # rank 0's only
    distributed, single = record(plain), two_tasks["single"]
    assert distributed["run_id"] == single["run_id"]
    assert (distributed["env"]["world_size"], distributed["env"]["backend"]) == (RANKS, "gloo")
    assert single["env"]["world_size"] == 1 and distributed["cost"]["resumes"] == 0
    assert_close_metrics(distributed, single, rel=1e-5)
    assert distributed["env"]["code_histogram"] == single["env"]["code_histogram"]

    (job,) = two_tasks["jobs"]["plain"].values()
    folder = plain.scratch_dir / "submitit" / job
    script = (plain.scratch_dir / "submitit" / job.split("_")[0] / f"{job.split('_')[0]}_submission.sh").read_text()
    assert "#SBATCH --ntasks-per-node=2" in script and "#SBATCH --nodes=1" in script
    for rank in range(RANKS):  # one task per rank, each with its own log
        assert f"global_rank={rank}({RANKS})" in (folder / f"{job}_{rank}_log.out").read_text()


@pytest.mark.slurm
def test_a_requeued_two_task_job_resumes_both_ranks_to_the_uninterrupted_record(two_tasks):
    assert two_tasks["codes"]["requeued"] == 0, two_tasks["outputs"]["requeued"]
    assert "completed 1, failed 0, requeued and resumed 1" in two_tasks["outputs"]["requeued"]
    resumed, uninterrupted = record(two_tasks["requeued"]), record(two_tasks["plain"])
    assert resumed["cost"]["resumes"] == 1 and resumed["env"]["world_size"] == RANKS
    # both ranks resumed from the checkpoint: a rank that started over would have trained other weights
    assert resumed["metrics"] == uninterrupted["metrics"]
    assert resumed["env"]["code_histogram"] == uninterrupted["env"]["code_histogram"]
    (job,) = two_tasks["jobs"]["requeued"].values()
    assert "REQUEUED" in sacct_states(job, duplicates=True)
    folder = two_tasks["requeued"].scratch_dir / "submitit" / job
    for rank in range(RANKS):  # the logs keep both attempts (append mode)
        log = (folder / f"{job}_{rank}_log.out").read_text()
        assert f"rank {rank}: holding at step {CKPT_EVERY}" in log
        assert f"rank {rank}: resumed from step {CKPT_EVERY} (resume 1)" in log


@pytest.mark.slurm
def test_a_cancelled_two_task_job_leaves_no_process_and_its_rerun_resumes(two_tasks):
    assert two_tasks["left_after_scancel"] == [], (
        f"still running {GONE_S} s after scancel:\n" + "\n".join(two_tasks["left_after_scancel"]))
    first = two_tasks["outputs"]["cancelled"]
    assert two_tasks["codes"]["cancelled"] == 1, first
    assert "completed 0, failed 1" in first and "CANCELLED" in first
    assert sacct_states(two_tasks["cancelled_job"])[0] == "CANCELLED"
    assert two_tasks["codes"]["rerun"] == 0, two_tasks["outputs"]["rerun"]
    resumed, uninterrupted = record(two_tasks["cancelled"]), record(two_tasks["plain"])
    assert resumed["cost"]["resumes"] == 1  # from the checkpoint the cancelled job wrote
    assert resumed["metrics"] == uninterrupted["metrics"]
    assert "completed 1, failed 0, requeued and resumed 1" in two_tasks["outputs"]["rerun"]


@pytest.mark.slurm
def test_sbatch_example_runs_one_run_over_two_tasks(cluster, tmp_path):  # noqa: F811
    """Element 2 of the script's grid (ema, seed 0) as one job of 2 tasks: srun starts both, each becomes one rank
    (RANK etc. from SLURM's variables, MASTER_ADDR/PORT from the script), and the run writes one record."""
    flags = ["--steps", "4", *TINY, "--batch-size", "8", "--set", "eval_batch_size=250", "--device", "cpu"]
    submit = ["sbatch", "--parsable", "--array=2", "--partition=debug", "--gpus-per-node=0", "--ntasks-per-node=2",
              "--cpus-per-task=1", "--mem=4G", "--time=10", str(ROOT / "slurm" / "sbatch-example.sh"), *flags]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHON": sys.executable, **ENV}
    answer = subprocess.run(submit, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert answer.returncode == 0, answer.stderr
    array = answer.stdout.strip().split(";")[0]
    log = tmp_path / f"slurm-vq-bench-{array}_2.out"
    try:
        deadline = time.monotonic() + DEADLINE_S
        while (states := sacct_states(array)) != ["COMPLETED"]:
            assert not set(states) - {"PENDING", "RUNNING", "COMPLETING"}, (
                f"{states}\n{log.read_text() if log.exists() else ''}")
            assert time.monotonic() < deadline, f"array {array} not done after {DEADLINE_S} s: {states}"
            time.sleep(1)
    finally:
        subprocess.run(["scancel", array], capture_output=True, timeout=60)

    trainers = grid(["--methods", "ste,ema", "--seeds", "0,1", "--out", str(tmp_path / "results"),
                     "--scratch", str(tmp_path / "runs"), *flags])
    assert [t.record_path.exists() for t in trainers] == [False, False, True, False]
    written = record(trainers[2])
    assert (written["spec"]["method"], written["spec"]["seed"]) == ("ema", 0)
    assert (written["env"]["world_size"], written["env"]["backend"]) == (RANKS, "gloo")
    assert "2 rank(s)" in log.read_text()
