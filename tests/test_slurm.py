"""The SLURM launcher against a real cluster, and the pieces of it that need none.

Tests marked `slurm` submit real jobs through submitit, usually to `slurm/local-cluster.sh`'s single-node cluster:
    eval "$(slurm/local-cluster.sh up | tail -1)"; python -m pytest tests/test_slurm.py; slurm/local-cluster.sh down
They skip only where no cluster can be reached (no `sbatch` on PATH, or SLURM_CONF unset). With
VQBENCH_REQUIRE_SLURM=1 (CI) they fail instead. Every wait has a deadline, so a stuck cluster fails the test and
does not hang it. Jobs ask for 1 CPU, 2 GB and 15 minutes in the partition debug (the `local` preset), and run
with --threads 1, so a run's metrics are bit-identical wherever and however often it was interrupted.
"""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.launch import ClusterOptions, cluster_options
from bench.run import build_specs, main, parser
from bench.train import Trainer
from tests.conftest import ROOT, TINY

SMALL = [*TINY, "--set", "eval_batch_size=250", "--eval-every", "0", "--threads", "1", "--quiet"]  # peak ~1.4 GB
SLURM = ["--launcher", "slurm", "--slurm-preset", "local", "--cpus-per-task", "1", "--mem-gb", "2", "--time", "15"]
# The interrupted runs must still be training for KillWait (5 s) after scancel or scontrol requeue: SLURM sends
# SIGTERM, which submitit's job ignores, and SIGKILL 5 s later. After the first checkpoint (step 50), 1500 steps
# leave ~10 s of training on an idle 2-core machine, ~25 s while the other runs share it.
LONG_STEPS, CKPT_EVERY = 1500, 50
DEADLINE_S = 300  # for one grid of jobs, from submission to the summary


@functools.cache
def cluster_problem() -> tuple[str, bool] | None:
    """(why no cluster can be used, whether that is a reason to skip), or None; asked once per session."""
    if shutil.which("sbatch") is None:
        return "no `sbatch` on PATH (no SLURM client)", True
    if not os.environ.get("SLURM_CONF"):
        return "SLURM_CONF is unset", True
    if not Path(os.environ["SLURM_CONF"]).is_file():  # sinfo would retry for 60 s
        return f"SLURM_CONF={os.environ['SLURM_CONF']} is not a file (is the cluster up?)", False
    # The partition debug must answer, and so must sacct: submitit sees CANCELLED and FAILED only through it.
    for command in (["sinfo", "-h", "-p", "debug", "-o", "%a %t"], ["sacct", "-n", "-X", "-S", "now-1minutes"]):
        try:
            answer = subprocess.run(command, capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(command)}` did not answer in 60 s (is the cluster up?)", False
        if answer.returncode != 0:
            return f"`{' '.join(command)}` failed (is the cluster up?): {answer.stderr.strip()}", False
    return None


@pytest.fixture(scope="module")
def cluster():
    """A SLURM cluster that answers and keeps accounting, or a skip (a failure under VQBENCH_REQUIRE_SLURM=1)."""
    problem = cluster_problem()
    if problem is None:
        return
    message, may_skip = problem
    if may_skip and os.environ.get("VQBENCH_REQUIRE_SLURM") != "1":
        pytest.skip(f'{message}: start the test cluster with `eval "$(slurm/local-cluster.sh up | tail -1)"`')
    if may_skip:
        message = f"VQBENCH_REQUIRE_SLURM=1 but {message}"
    pytest.fail(message, pytrace=False)


class CLI:
    """`python -m bench.run ARGS` in the background, with its output in files, polled against deadlines."""

    def __init__(self, args: list[str], logs: Path, entry: list[str] = ("-m", "bench.run"), env: dict | None = None):
        logs.mkdir(parents=True, exist_ok=True)
        self.stdout_path, self.stderr_path = logs / "stdout.txt", logs / "stderr.txt"
        env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.process = subprocess.Popen([sys.executable, *entry, *args], cwd=ROOT, env=env,
                                            stdout=out, stderr=err)

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def job_ids(self) -> dict[str, str]:
        """run id -> SLURM job id, from the launcher's `RUN_ID: job JOB_ID` lines (ARRAY_INDEX for an array; a
        grid of one run is one plain job)."""
        return dict(re.findall(r"^(\S+): job (\d+(?:_\d+)?)$", self.stdout, re.MULTILINE))

    def wait_until(self, condition, what: str, timeout: float = DEADLINE_S):
        deadline = time.monotonic() + timeout
        while not (result := condition()):
            assert self.process.poll() is None, f"bench.run ended before {what}:\n{self.stdout}\n{self.stderr}"
            assert time.monotonic() < deadline, f"no {what} after {timeout} s:\n{self.stdout}\n{self.stderr}"
            time.sleep(0.05)
        return result

    def finish(self, timeout: float = DEADLINE_S) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"bench.run did not finish in {timeout} s:\n{self.stdout}\n{self.stderr}")

    def stop(self):
        """Kill the command if it still runs and cancel its jobs: a failed test leaves nothing in the queue."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        ids = sorted(set(self.job_ids().values()))
        if ids:
            subprocess.run(["scancel", *ids], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def background():
    started: list[CLI] = []

    def start(args, logs, **kwargs):
        started.append(CLI(args, logs, **kwargs))
        return started[-1]

    yield start
    for cli in started:
        cli.stop()


def grid(args: list[str]) -> list[Trainer]:
    """The runs `bench.run ARGS` would launch, as Trainers: their run ids, checkpoint and record paths."""
    parsed = parser().parse_args(args)
    return [Trainer(spec, Path(parsed.out).resolve(), Path(parsed.scratch).resolve())
            for spec in build_specs(parsed)]


def dirs_args(root: Path) -> list[str]:
    return ["--out", str(root / "results"), "--scratch", str(root / "runs")]


def record(trainer: Trainer) -> dict:
    return json.loads(trainer.record_path.read_text())


def sacct_states(job_id: str, duplicates: bool = False) -> list[str]:
    """Every state sacct recorded for a job (with duplicates=True, also those before each requeue)."""
    command = ["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id] + (["-D"] if duplicates else [])
    answer = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert answer.returncode == 0, answer.stderr
    return answer.stdout.split()


# --- a grid of three runs ---------------------------------------------------------------------------------


@pytest.mark.slurm
def test_array_of_three_runs_gives_three_records_and_the_summary(cluster, background, tmp_path):
    args = ["--methods", "ste", "--seeds", "0,1,2", "--steps", "20", *SMALL, *SLURM, *dirs_args(tmp_path)]
    cli = background(args, tmp_path / "cli")
    assert cli.finish() == 0, cli.stdout + cli.stderr
    assert "completed 3, failed 0, requeued and resumed 0" in cli.stdout

    trainers = grid(args)
    jobs = cli.job_ids()
    assert sorted(jobs) == sorted(t.run_id for t in trainers)
    array = {job.split("_")[0] for job in jobs.values()}
    assert len(array) == 1 and sorted(job.split("_")[1] for job in jobs.values()) == ["0", "1", "2"]  # one array
    for trainer in trainers:
        assert record(trainer)["run_id"] == trainer.run_id and record(trainer)["cost"]["resumes"] == 0
        assert sacct_states(jobs[trainer.run_id]) == ["COMPLETED"]

    (script,) = (tmp_path / "runs" / "submitit").rglob("*_submission.sh")  # what submitit gave sbatch
    header = set(re.findall(r"^#SBATCH (\S+)$", script.read_text(), re.MULTILINE))
    assert {"--array=0-2%3", "--partition=debug", "--cpus-per-task=1", "--mem=2GB", "--time=15",
            "--requeue"} <= header
    assert not any(line.startswith("--gpus") for line in header)  # asked for none: no GPU line at all
    assert "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$SLURM_CPUS_PER_TASK}" in script.read_text()


# --- one grid, three fates: cancelled, requeued, preempted -------------------------------------------------


@pytest.fixture(scope="module")
def interrupted(cluster, background, tmp_path_factory):
    """Seeds 0, 1 and 2 of one grid on the cluster. At each run's first checkpoint: seed 0 is requeued with
    `scontrol requeue`, seed 1 is cancelled with `scancel`, seed 2 gets SIGUSR2 (what SLURM sends before the time
    limit and on preemption; submitit then calls Trainer.checkpoint() and requeues the job). Meanwhile the same
    runs of seeds 0 and 2 go uninterrupted through the inline launcher, for comparison."""
    root = tmp_path_factory.mktemp("interrupted")
    common = ["--methods", "ste", "--steps", str(LONG_STEPS), "--ckpt-every", str(CKPT_EVERY), *SMALL]
    args = [*common, "--seeds", "0,1,2", *SLURM, *dirs_args(root / "slurm")]
    requeued, cancelled, preempted = grid(args)
    inline_args = [*common, "--seeds", "0,2", *dirs_args(root / "inline")]
    inline_requeued, inline_preempted = grid(inline_args)

    cli = background(args, root / "slurm-cli")
    inline = background(inline_args, root / "inline-cli")
    jobs = cli.wait_until(lambda: len(cli.job_ids()) == 3 and cli.job_ids(), "job ids")
    actions = {cancelled: ["scancel", jobs[cancelled.run_id]],
               requeued: ["scontrol", "requeue", jobs[requeued.run_id]],
               preempted: ["scancel", "--signal=USR2", jobs[preempted.run_id]]}
    pending = set(actions)
    while pending:  # act on each run as soon as its first checkpoint is on disk
        ready = cli.wait_until(lambda: [t for t in pending if t.checkpoint_path.exists()], "checkpoint")
        for trainer in ready:
            assert not trainer.record_path.exists(), f"{trainer.run_id} finished before it could be interrupted"
            command = actions[trainer]
            answer = subprocess.run(command, capture_output=True, text=True, timeout=60)
            assert answer.returncode == 0, f"{' '.join(command)}: {answer.stderr}"
            pending.discard(trainer)

    code = cli.finish()
    inline_code = inline.finish()
    assert inline_code == 0, inline.stdout + inline.stderr
    return {"code": code, "stdout": cli.stdout, "stderr": cli.stderr, "jobs": jobs, "requeued": requeued,
            "cancelled": cancelled, "preempted": preempted, "inline_requeued": inline_requeued,
            "inline_preempted": inline_preempted}


@pytest.mark.slurm
def test_cancelled_job_is_reported_failed_with_its_log_and_the_others_complete(interrupted):
    cancelled = interrupted["cancelled"]
    job = interrupted["jobs"][cancelled.run_id]
    assert interrupted["code"] == 1  # some runs failed
    assert "completed 2, failed 1, requeued and resumed 2" in interrupted["stdout"], interrupted["stdout"]
    (line,) = [line for line in interrupted["stdout"].splitlines() if line.strip().startswith("failed ")]
    assert f"failed {cancelled.run_id} (job {job})" in line and "CANCELLED" in line
    log = Path(line.split("log: ")[1])
    assert log.is_file() and "CANCELLED" in log.read_text()  # slurmstepd's own line in the job's stderr
    assert not cancelled.record_path.exists()
    assert interrupted["requeued"].record_path.exists() and interrupted["preempted"].record_path.exists()
    assert sacct_states(job)[0] == "CANCELLED"


@pytest.mark.slurm
def test_requeued_job_resumes_to_the_metrics_of_an_uninterrupted_run(interrupted):
    resumed, uninterrupted = record(interrupted["requeued"]), record(interrupted["inline_requeued"])
    assert resumed["cost"]["resumes"] >= 1, "no resume: did the run finish within KillWait after the requeue?"
    assert resumed["metrics"] == uninterrupted["metrics"]  # floats compared exactly: bit for bit
    assert uninterrupted["cost"]["resumes"] == 0
    assert "REQUEUED" in sacct_states(interrupted["jobs"][resumed["run_id"]], duplicates=True)


@pytest.mark.slurm
def test_preempted_job_checkpoints_through_submitit_and_resumes(interrupted):
    preempted = interrupted["preempted"]
    resumed, uninterrupted = record(preempted), record(interrupted["inline_preempted"])
    assert resumed["cost"]["resumes"] >= 1
    assert resumed["metrics"] == uninterrupted["metrics"]
    job = interrupted["jobs"][preempted.run_id]
    log = (preempted.scratch_dir / "submitit" / job / f"{job}_0_log.out").read_text()  # submitit's INFO lines
    assert "this job is preempted" in log  # not timed out: the 15 min limit is far
    assert "Calling checkpoint method" in log and f"Requeued job {job}" in log  # Trainer.checkpoint() ran


# --- slurm/sbatch-example.sh ------------------------------------------------------------------------------


@pytest.mark.slurm
def test_sbatch_example_runs_one_run_of_the_grid_per_array_element(cluster, tmp_path):
    """Elements 0 and 1 of the script's grid (ste and ema, seeds 0 and 1): ste seeds 0 and 1. The first element
    warns that the array leaves out runs 2 and 3."""
    flags = ["--steps", "20", *TINY, "--set", "eval_batch_size=250"]
    submit = ["sbatch", "--parsable", "--array=0-1", "--partition=debug", "--gpus-per-node=0", "--cpus-per-task=1",
              "--mem=2G", "--time=10", str(ROOT / "slurm" / "sbatch-example.sh"), *flags]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHON": sys.executable}
    answer = subprocess.run(submit, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert answer.returncode == 0, answer.stderr
    array = answer.stdout.strip().split(";")[0]
    try:
        deadline = time.monotonic() + DEADLINE_S
        while (states := sacct_states(array)) != ["COMPLETED", "COMPLETED"]:
            assert not set(states) - {"PENDING", "RUNNING", "COMPLETING", "COMPLETED"}, states
            assert time.monotonic() < deadline, f"array {array} not done after {DEADLINE_S} s: {states}"
            time.sleep(1)
    finally:
        subprocess.run(["scancel", array], capture_output=True, timeout=60)

    script_grid = ["--methods", "ste,ema", "--seeds", "0,1", "--out", str(tmp_path / "results"),
                   "--scratch", str(tmp_path / "runs"), *flags]
    trainers = grid(script_grid)
    assert [t.record_path.exists() for t in trainers] == [True, True, False, False]
    assert [record(t)["spec"]["seed"] for t in trainers[:2]] == [0, 1]
    first_log = (tmp_path / f"slurm-vq-bench-{array}_0.out").read_text()
    assert "the grid has 4 runs, but this array ends at 1" in first_log


# --- without a cluster ------------------------------------------------------------------------------------


def test_count_prints_the_size_of_the_grid(capsys, tmp_path):
    assert main(["--methods", "ste,ema", "--seeds", "0,1,2", "--count", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == "6"
    assert not list(tmp_path.rglob("*.json"))


def test_array_index_runs_only_that_run_of_the_grid(dirs):
    args = ["--methods", "ste,ema", "--seeds", "0,1", "--steps", "3", *TINY, "--quiet",
            "--out", str(dirs["out"]), "--scratch", str(dirs["scratch"])]
    assert main([*args, "--array-index", "2"]) == 0
    (path,) = dirs["out"].rglob("*.json")
    assert json.loads(path.read_text())["run_id"] == grid(args)[2].run_id  # methods first, then seeds: ema s0


@pytest.mark.parametrize("extra, message", [
    (["--array-index", "4"], "--array-index 4 is outside the grid of 4 run(s)"),
    (["--array-index", "-1"], "outside the grid"),
    (["--array-index", "0", "--launcher", "slurm"], "use it with --launcher inline"),
])
def test_array_index_is_refused_where_it_cannot_pick_one_run(extra, message, dirs, capsys):
    code = main(["--methods", "ste,ema", "--seeds", "0,1", *extra, "--out", str(dirs["out"])])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err
    assert not dirs["out"].exists()


def test_cluster_presets_fill_cluster_options_and_flags_override_them():
    local = cluster_options("local", {})
    assert (local.partition, local.cpus_per_task, local.mem_gb, local.gpus_per_node) == ("debug", 1, 2, 0)
    gpu = cluster_options("example-gpu", {"time_min": 60, "account": None})
    assert (gpu.partition, gpu.gpus_per_node, gpu.cpus_per_task, gpu.mem_gb) == ("gpu", 1, 8, 32)
    assert gpu.time_min == 60 and gpu.account is None  # a flag wins; an unset flag (None) leaves the preset
    assert "gpus_per_node" not in local.submitit_parameters("slurm")  # no --gpus-per-node=0 line
    assert local.submitit_parameters("slurm")["slurm_partition"] == "debug"
    for path in sorted((ROOT / "slurm").glob("*.toml")):  # every key of every preset is a ClusterOptions field
        assert isinstance(cluster_options(path.stem, {}), ClusterOptions)


def test_the_multi_gpu_preset_asks_for_one_task_per_gpu_and_nodes_multiply_the_ranks():
    node = cluster_options("example-8gpu", {})
    params = node.submitit_parameters("slurm")
    assert (params["nodes"], params["tasks_per_node"], params["gpus_per_node"], node.world_size) == (1, 8, 8, 8)
    two = cluster_options("example-8gpu", {"nodes": 2})
    assert (two.submitit_parameters("slurm")["nodes"], two.world_size) == (2, 16)
    assert cluster_options("example-gpu", {}).world_size == 1


def test_unknown_preset_names_the_presets_there_are():
    from bench import UserError

    with pytest.raises(UserError, match="presets in slurm/: .*example-gpu.*local"):
        cluster_options("nosuch", {})


def test_trainer_checkpoint_is_a_fresh_trainer_that_submitit_can_pickle(dirs, tmp_path):
    """What submitit's SIGUSR2 handler does: call checkpoint() mid-run and pickle the result for the requeue."""
    import submitit

    args = ["--methods", "ste", "--steps", "3", *TINY, "--out", str(dirs["out"]), "--scratch", str(dirs["scratch"])]
    (spec,) = build_specs(parser().parse_args(args))
    trainer = Trainer(spec, dirs["out"], dirs["scratch"], progress=False)
    trainer.setup()  # a trainer mid-run holds a model, data and closures: none of it may travel
    delayed = trainer.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    delayed.dump(tmp_path / "submitted.pkl")
    loaded = submitit.helpers.DelayedSubmission.load(tmp_path / "submitted.pkl")
    fresh = loaded.function
    assert isinstance(fresh, Trainer) and not hasattr(fresh, "model")
    assert (fresh.spec, fresh.record_path, fresh.checkpoint_path) == (spec, trainer.record_path,
                                                                      trainer.checkpoint_path)


def test_failure_line_names_the_exception_of_the_run_or_the_state_of_the_job():
    from submitit.core.utils import FailedJobError, UncompletedJobError

    from bench.launch import _failure_reason

    class Job:  # what follow() reads of a submitit job
        state = "CANCELLED by 0"

    trace = "Traceback (most recent call last):\n  File \"x.py\", line 1\nbench.UserError: checkpoint is corrupt"
    raised = FailedJobError(f"Job (task=0) failed during processing with trace:\n----------------------\n{trace}\n"
                            "----------------------\nYou can check full logs with ...\n  - a.err\n  - a.out")
    assert _failure_reason(Job(), raised) == "bench.UserError: checkpoint is corrupt"
    uncompleted = UncompletedJobError("Job 3_1 (task: 0) with path x\nhas not produced any output (state: ...)")
    assert _failure_reason(Job(), uncompleted) == "ended without a result, state CANCELLED by 0"
