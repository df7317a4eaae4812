"""Run records: one JSON file per run, written atomically; a loader that turns a directory into a DataFrame."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pandas as pd

from bench import UserError

RECORD_KEYS = ("experiment", "spec", "metrics", "cost", "null_reasons", "curves", "env")


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_record(path: Path, record: dict) -> None:
    missing = [k for k in RECORD_KEYS if k not in record]
    if missing:
        raise ValueError(f"record lacks {missing}")
    write_atomic(Path(path), json.dumps(record, indent=1, allow_nan=False) + "\n")


def read_records(directory: str | Path) -> list[dict]:
    """Every record under a directory (recursively); other JSON files are ignored."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory} is not a directory; pass the results directory of a run (--out)")
    records = []
    for path in sorted(directory.rglob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(record, dict) and all(k in record for k in RECORD_KEYS):
            record["_path"] = str(path)
            records.append(record)
    return records


def load_records(directory: str | Path) -> pd.DataFrame:
    """One row per run: experiment, run_id, spec.*, metrics.*, cost.* columns."""
    records = read_records(directory)
    if not records:
        raise UserError(f"no run records under {directory}; run `python -m bench.run --out {directory}` first")
    rows = [
        {"experiment": r["experiment"], "run_id": r.get("run_id"), "path": r["_path"],
         **{f"spec.{k}": v for k, v in r["spec"].items() if not isinstance(v, (dict, list))},
         **{f"metrics.{k}": v for k, v in r["metrics"].items()},
         **{f"cost.{k}": v for k, v in r["cost"].items()}}
        for r in records
    ]
    return pd.DataFrame(rows)
