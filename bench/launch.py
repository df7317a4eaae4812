"""Launchers: how a list of RunSpecs becomes records.

inline  one run after another in this process (the default)
local   submitit subprocesses on this machine
slurm   submitit on a SLURM cluster: one array element per RunSpec; preempted or timed-out jobs are requeued
        and resume from their last checkpoint (the Trainer is its own checkpoint, see bench/train.py)
"""
from __future__ import annotations

import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from bench import UserError
from bench.spec import RunSpec
from bench.train import Trainer

SLURM_DIR = Path(__file__).resolve().parent.parent / "slurm"


@dataclass
class ClusterOptions:
    """Everything a SLURM job asks for, in one place (a preset file in slurm/ fills it, flags override)."""

    partition: str | None = None
    gpus_per_node: int = 0
    cpus_per_task: int = 2
    mem_gb: int = 4  # each job imports torch (~0.8 GB resident)
    time_min: int = 240
    array_parallelism: int = 64
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    signal_delay_s: int = 120
    sbatch: dict = field(default_factory=dict)  # any further #SBATCH key=value
    setup: list = field(default_factory=list)  # shell lines run before the job (module load, conda activate)

    def submitit_parameters(self, cluster: str) -> dict:
        if cluster == "local":
            return {"timeout_min": self.time_min, "cpus_per_task": self.cpus_per_task, "gpus_per_node": self.gpus_per_node}
        params = {
            "timeout_min": self.time_min, "cpus_per_task": self.cpus_per_task, "mem_gb": self.mem_gb,
            "gpus_per_node": self.gpus_per_node, "tasks_per_node": 1, "nodes": 1,
            "slurm_array_parallelism": self.array_parallelism, "slurm_signal_delay_s": self.signal_delay_s,
            "slurm_additional_parameters": {"requeue": True, **self.sbatch},
            "slurm_setup": list(self.setup),
        }
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(self, key):
                params[f"slurm_{key}"] = getattr(self, key)
        return params


def cluster_options(preset: str | None, flags: dict) -> ClusterOptions:
    values: dict = {}
    if preset:
        path = Path(preset) if preset.endswith(".toml") else SLURM_DIR / f"{preset}.toml"
        if not path.is_file():
            names = sorted(p.stem for p in SLURM_DIR.glob("*.toml"))
            raise UserError(f"unknown SLURM preset {preset!r}; presets in slurm/: {', '.join(names)} (or a .toml path)")
        values = tomllib.loads(path.read_text())
        values.pop("description", None)
    values.update({k: v for k, v in flags.items() if v is not None})
    try:
        return ClusterOptions(**values)
    except TypeError as error:
        raise UserError(f"bad SLURM option ({error}); see `python -m bench.run --help`") from None


def describe(trainer: Trainer) -> str:
    if trainer.record_path.exists():
        return "skip (record exists)"
    return "resume" if trainer.checkpoint_path.exists() else "run"


def launch_inline(specs: list[RunSpec], out_dir: Path, scratch_dir: Path, options: dict) -> list[Path]:
    paths = []
    for i, spec in enumerate(specs, 1):
        trainer = Trainer(spec, out_dir, scratch_dir, progress=not options.get("quiet"))
        print(f"[{i}/{len(specs)}] {spec.run_id()}: {describe(trainer)}", flush=True)
        paths.append(trainer())
    return paths


def launch_submitit(cluster: str, specs: list[RunSpec], out_dir: Path, scratch_dir: Path, options: dict) -> list[Path]:
    import submitit

    trainers = [Trainer(spec, out_dir.resolve(), scratch_dir.resolve(), progress=False) for spec in specs]
    done = [t.record_path for t in trainers if t.record_path.exists()]
    todo = [t for t in trainers if not t.record_path.exists()]
    for t in trainers:
        if t.record_path.exists():
            print(f"{t.run_id}: skip (record exists)")
    if not todo:
        return done
    settings = cluster_options(options.get("slurm_preset"), options.get("cluster_flags", {}))
    executor = submitit.AutoExecutor(folder=scratch_dir.resolve() / "submitit" / "%j", cluster=cluster)
    executor.update_parameters(name="vq-bench", **settings.submitit_parameters(cluster))
    with executor.batch():
        jobs = [executor.submit(t) for t in todo]
    for job, trainer in zip(jobs, todo):
        print(f"{trainer.run_id}: job {job.job_id}", flush=True)
    if options.get("no_wait"):
        print("submitted; `python -m bench.report OUT` once they finish (rerunning this command waits for them)")
        return done
    return done + follow(jobs, todo)


def follow(jobs, trainers: list[Trainer]) -> list[Path]:
    """Wait with a progress bar, then summarize: completed, failed (with each log), requeued."""
    bar = tqdm(total=len(jobs), desc="jobs", dynamic_ncols=True)
    pending = set(range(len(jobs)))
    while pending:
        finished = {i for i in pending if jobs[i].done()}
        bar.update(len(finished))
        pending -= finished
        if pending:
            time.sleep(2)
    bar.close()
    completed, failed = [], []
    for job, trainer in zip(jobs, trainers):
        try:
            completed.append(Path(job.result()))
        except Exception as error:  # one failed run fails alone
            failed.append((trainer.run_id, job.job_id, job.paths.stderr, str(error).strip().splitlines()[-1:]))
    requeued = [p for p in completed if _resumes(p)]
    print(f"\ncompleted {len(completed)}, failed {len(failed)}, requeued and resumed {len(requeued)}")
    for run_id, job_id, log, last in failed:
        print(f"  failed {run_id} (job {job_id}): {' '.join(last)}; log: {log}")
    return completed


def _resumes(record_path: Path) -> int:
    import json

    return json.loads(Path(record_path).read_text())["cost"].get("resumes", 0)


LAUNCHERS: dict[str, Callable[..., list[Path]]] = {
    "inline": launch_inline,
    "local": lambda *a: launch_submitit("local", *a),
    "slurm": lambda *a: launch_submitit("slurm", *a),
}
