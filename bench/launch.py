"""Launchers: how a list of RunSpecs becomes records.

inline  one run after another in this process (the default)
local   submitit subprocesses on this machine
slurm   submitit on a SLURM cluster: one array element per RunSpec; preempted or timed-out jobs are requeued
        and resume from their last checkpoint (the Trainer is its own checkpoint, see bench/train.py)
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from bench import UserError
from bench.options import build, option
from bench.spec import RunSpec, read_toml
from bench.distributed import check_batch, environment_rank
from bench.train import Trainer

SLURM_DIR = Path(__file__).resolve().parent.parent / "slurm"


@dataclass
class ClusterOptions:
    """Everything a SLURM job asks for, in one place (a preset file in slurm/ fills it, flags override)."""

    partition: str | None = option(None, "SLURM partition")
    gpus_per_node: int = option(0, "GPUs per node of a job; above 1, one data-parallel rank (task) per GPU", minimum=0)
    nodes: int = option(1, "nodes per run (data parallel: gpus-per-node ranks on each)", minimum=1)
    ranks: int = option(0, "data-parallel ranks per node on CPUs (--launcher local: R CPU processes, gloo); 0: one "
                           "per GPU, or one", minimum=0)
    cpus_per_task: int = option(2, "CPUs per task: per job, or per rank of a data-parallel job", minimum=1)
    mem_gb: int = option(4, "memory per node of a job in GB, shared by the job's ranks there (each process imports "
                            "torch, ~0.8 GB resident)", minimum=1)
    time_min: int = option(240, "time limit in minutes", flag="--time", minimum=1)
    array_parallelism: int = option(64, "at most this many array elements at once", minimum=1)
    account: str | None = option(None, "sbatch --account")
    qos: str | None = option(None, "sbatch --qos")
    constraint: str | None = option(None, "sbatch --constraint")
    signal_delay_s: int = option(120, flag=False, minimum=0)
    sbatch: dict = option(flag=False, factory=dict)  # any further #SBATCH key=value (the --sbatch flag)
    setup: list = option(flag=False, factory=list)  # shell lines run before the job (module load, conda activate)

    @property
    def tasks_per_node(self) -> int:
        """One task per data-parallel rank: --ranks where given, else one per GPU (at least one)."""
        return self.ranks or max(self.gpus_per_node, 1)

    @property
    def world_size(self) -> int:
        return self.tasks_per_node * self.nodes

    def submitit_parameters(self, cluster: str) -> dict:
        if cluster == "local":
            if self.nodes > 1:
                raise UserError(f"--nodes {self.nodes}: --launcher local runs on this machine; use --ranks R")
            return {"timeout_min": self.time_min, "cpus_per_task": self.cpus_per_task, "gpus_per_node": self.gpus_per_node,
                    "tasks_per_node": self.tasks_per_node}
        params = {
            "timeout_min": self.time_min, "cpus_per_task": self.cpus_per_task, "mem_gb": self.mem_gb,
            "tasks_per_node": self.tasks_per_node, "nodes": self.nodes,
            "slurm_array_parallelism": self.array_parallelism, "slurm_signal_delay_s": self.signal_delay_s,
            "slurm_additional_parameters": {"requeue": True, **self.sbatch},
            # torch would start one thread per core of the node, whatever the job was granted (--threads wins)
            "slurm_setup": ["export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$SLURM_CPUS_PER_TASK}", *self.setup],
        }
        if self.gpus_per_node:  # no --gpus-per-node=0 line: some clusters without GRES refuse any GPU request
            params["gpus_per_node"] = self.gpus_per_node
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(self, key):
                params[f"slurm_{key}"] = getattr(self, key)
        return params


def cluster_options(preset: str | None, flags: dict) -> ClusterOptions:
    """A cluster preset's values (slurm/NAME.toml or a path) under the command line's flags, typed and checked."""
    values: dict = {}
    if preset:
        path = Path(preset) if preset.endswith(".toml") else SLURM_DIR / f"{preset}.toml"
        if not path.is_file():
            names = sorted(p.stem for p in SLURM_DIR.glob("*.toml"))
            raise UserError(f"unknown SLURM preset {preset!r}; presets in slurm/: {', '.join(names)} (or a .toml path)")
        values = read_toml(path)
        values.pop("description", None)
    values.update(flags)
    return build(ClusterOptions, values, "SLURM option(s)")


def describe(trainer: Trainer) -> str:
    if trainer.record_path.exists():
        return "skip (record exists)"
    return "resume" if trainer.checkpoint_path.exists() else "run"


def launch_inline(specs: list[RunSpec], out_dir: Path, scratch_dir: Path, options: dict) -> list[Path]:
    paths = []
    for i, spec in enumerate(specs, 1):
        trainer = Trainer(spec, out_dir, scratch_dir, progress=not options.get("quiet"),
                          keep_checkpoints=bool(options.get("keep_checkpoints")))
        if environment_rank() == 0:  # under torchrun, rank 0 alone prints
            print(f"[{i}/{len(specs)}] {spec.run_id()}: {describe(trainer)}", flush=True)
        paths.append(trainer())
    return paths


def launch_submitit(cluster: str, specs: list[RunSpec], out_dir: Path, scratch_dir: Path, options: dict) -> list[Path]:
    import submitit

    settings = cluster_options(options.get("slurm_preset"), options.get("cluster_flags", {}))
    world = settings.world_size
    for spec in specs:  # refused before anything is submitted
        check_batch(spec.batch_size, world)
    trainers = [Trainer(spec, out_dir.resolve(), scratch_dir.resolve(), progress=False,
                        keep_checkpoints=bool(options.get("keep_checkpoints")), submitit_ranks=world > 1)
                for spec in specs]
    done = [t.record_path for t in trainers if t.record_path.exists()]
    todo = [t for t in trainers if not t.record_path.exists()]
    for t in trainers:
        if t.record_path.exists():
            print(f"{t.run_id}: skip (record exists)")
    if not todo:
        return done
    if cluster == "slurm":
        missing = [c for c in ("sbatch", "sacct") if shutil.which(c) is None]
        if missing:
            raise UserError(f"--launcher slurm needs {' and '.join(missing)} on PATH (a SLURM client; sacct is how "
                            "finished, failed and cancelled jobs are seen); or use --launcher local or inline")
    executor = submitit.AutoExecutor(folder=scratch_dir.resolve() / "submitit" / "%j", cluster=cluster)
    executor.update_parameters(name="vq-bench", **settings.submitit_parameters(cluster))
    try:
        with executor.batch():
            jobs = [executor.submit(t) for t in todo]
    except submitit.core.utils.FailedJobError as error:  # sbatch refused: its own words, on one line
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise UserError(f"sbatch refused the jobs: {'; '.join(lines)}") from None
    for job, trainer in zip(jobs, todo):
        print(f"{trainer.run_id}: job {job.job_id}", flush=True)
    if options.get("no_wait"):
        print(f"submitted {len(jobs)} job(s); logs in {scratch_dir.resolve() / 'submitit'}; `squeue --me` to watch, "
              f"`python -m bench.report OUT` once they finish (do not rerun this command before: it would submit "
              f"the unfinished runs again)")
        return done
    return done + follow(jobs, todo, progress=not options.get("quiet"))


def follow(jobs, trainers: list[Trainer], progress: bool = True, poll_s: float = 2.0) -> list[Path]:
    """Wait with a progress bar, then summarize: completed, failed (with each log), requeued and resumed.

    A job is done when its result file exists or sacct says it left the queue (COMPLETED, FAILED, CANCELLED,
    TIMEOUT, ...); submitit asks sacct at most every few seconds at first, then less often (up to 10 min).
    A requeued job (scontrol requeue, preemption, time-out) is not done while it waits or runs again.
    """
    bar = tqdm(total=len(jobs), desc="jobs", dynamic_ncols=True, disable=not progress)
    pending = set(range(len(jobs)))
    while pending:
        finished = {i for i in pending if jobs[i].done()}
        bar.update(len(finished))
        pending -= finished
        if pending:
            time.sleep(poll_s)
    bar.close()
    completed, failed = [], []
    for job, trainer in zip(jobs, trainers):
        try:
            completed.append(Path(job.results()[0]))  # a data-parallel job has one result per rank; rank 0's
        except Exception as error:  # one failed run fails alone
            failed.append((trainer.run_id, job, _failure_reason(job, error)))
    requeued = [p for p in completed if _resumes(p)]
    print(f"\ncompleted {len(completed)}, failed {len(failed)}, requeued and resumed {len(requeued)}", flush=True)
    for run_id, job, reason in failed:
        log = job.paths.stderr
        where = f"log: {log}" if log.exists() else f"no log (the job never started; {log} does not exist)"
        print(f"  failed {run_id} (job {job.job_id}): {reason}; {where}", flush=True)
    return completed


def _failure_reason(job, error: Exception) -> str:
    """One line: the run's exception (the last line of the traceback submitit brings back), or SLURM's state
    when the job ended without any result (CANCELLED, TIMEOUT, OUT_OF_MEMORY, NODE_FAIL, ...)."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if isinstance(error, FailedJobError):  # the trace sits between two dashed lines
        rules = [i for i, line in enumerate(lines) if set(line) == {"-"}]
        trace = lines[rules[0] + 1:rules[1]] if len(rules) >= 2 else lines
        return trace[-1] if trace else type(error).__name__
    if isinstance(error, UncompletedJobError):
        try:
            state = job.state  # what sacct last said
        except Exception:
            state = "UNKNOWN"
        return f"ended without a result, state {state}" if state != "UNKNOWN" else "ended without a result"
    return lines[-1] if lines else type(error).__name__


def _resumes(record_path: Path) -> int:
    import json

    return json.loads(Path(record_path).read_text())["cost"].get("resumes", 0)


LAUNCHERS: dict[str, Callable[..., list[Path]]] = {
    "inline": launch_inline,
    "local": lambda *a: launch_submitit("local", *a),
    "slurm": lambda *a: launch_submitit("slurm", *a),
}
