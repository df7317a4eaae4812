"""Launchers: how a list of RunSpecs becomes records. `inline` runs them one after another in this process."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from bench.spec import RunSpec
from bench.train import Trainer


def launch_inline(specs: list[RunSpec], out_dir: Path, scratch_dir: Path, options: dict) -> list[Path]:
    paths = []
    for i, spec in enumerate(specs, 1):
        trainer = Trainer(spec, out_dir, scratch_dir, progress=not options.get("quiet"))
        state = "skip (record exists)" if trainer.record_path.exists() else (
            "resume" if trainer.checkpoint_path.exists() else "run")
        print(f"[{i}/{len(specs)}] {spec.run_id()}: {state}", flush=True)
        paths.append(trainer())
    return paths


LAUNCHERS: dict[str, Callable[..., list[Path]]] = {"inline": launch_inline}
