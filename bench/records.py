"""Run records: one JSON file per run, written atomically; a loader that turns a directory into a DataFrame.

A record's `status` is "complete" or "diverged" (the training loss became non-finite: `divergence` holds the
step and the last finite loss, the test metrics are null with the reason). Records written before the field
existed are complete runs.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
from pathlib import Path

import pandas as pd

from bench import UserError

RECORD_KEYS = ("experiment", "spec", "metrics", "cost", "null_reasons", "curves", "env")
COMPLETE, DIVERGED = "complete", "diverged"
RUN_ID_FILE = re.compile(r".+-s\d+-[0-9a-f]{10}\.json")  # what RunSpec.run_id() names a record


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "wb"):
    """Open a temporary file beside `path` for writing; on success it replaces `path` in one rename, so a
    reader never sees half a file. The temporary's name is unique (pid and a random token), so two writers never
    share one; it is created with mode 0666 minus the umask (0644 under the usual umask 022), as open() would.
    On any failure, Ctrl-C included, the temporary is removed and `path` left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: Path, text: str) -> None:
    """Write text to a temporary file in the same folder, then rename: a reader never sees half a file."""
    with atomic_file(Path(path), "w") as f:
        f.write(text)


def write_record(path: Path, record: dict) -> None:
    missing = [k for k in RECORD_KEYS if k not in record]
    if missing:
        raise ValueError(f"record lacks {missing}")
    write_atomic(Path(path), json.dumps(record, indent=1, allow_nan=False) + "\n")


def finite_or_none(value, where: str = "", found: list[str] | None = None):
    """`value` with every non-finite float (NaN, inf) inside it replaced by None; their dotted paths are appended
    to `found`. JSON has no NaN: a record says null instead, and why."""
    if isinstance(value, float) and not math.isfinite(value):
        if found is not None:
            found.append(where)
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v, f"{where}.{k}" if where else str(k), found) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v, f"{where}.{i}" if where else str(i), found) for i, v in enumerate(value)]
    return value


def check_experiment_name(name: str) -> None:
    """An experiment names one folder under --out and --scratch: a plain name, never a path."""
    if (not name or name in (".", "..") or name.startswith(".") or any(c in name for c in "/\\\0")
            or len(name) > 200):
        raise UserError(f"--experiment {name!r} is not a plain folder name (no '/', '\\', leading '.', or '..'; at "
                        f"most 200 characters): records go to OUT/<experiment>/; e.g. --experiment "
                        f"{re.sub(r'[^A-Za-z0-9._+-]+', '-', name).strip('.-') or 'default'}")


# --- reading ----------------------------------------------------------------------------------------------------

def looks_like_record(path: Path, text: str) -> bool:
    """Whether an unreadable .json file was meant to be a record: named like one (RUN_ID.json), beside its
    samples, or starting as write_record starts one."""
    return (RUN_ID_FILE.fullmatch(path.name) is not None or path.with_suffix(".samples.npz").exists()
            or re.match(r'\s*\{\s*"experiment"', text) is not None)


def read_records(directory: str | Path) -> list[dict]:
    """Every record under a directory (recursively); other JSON files are ignored. A record that is empty,
    truncated or lacks keys is refused (UserError naming the files): a lost run must not vanish silently from
    the means."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory} is not a directory; pass the results directory of a run (--out)")
    records, damaged = [], []
    for path in sorted(directory.rglob("*.json")):
        try:
            text = path.read_text()
        except OSError as error:
            damaged.append(f"{path} ({error.strerror or error})")
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            if looks_like_record(path, text):
                damaged.append(f"{path} ({'empty' if not text.strip() else f'truncated: {error}'})")
            continue
        if isinstance(record, dict) and all(k in record for k in RECORD_KEYS):
            record["_path"] = str(path)
            records.append(record)
        elif isinstance(record, dict) and RUN_ID_FILE.fullmatch(path.name) and "run_id" in record:
            damaged.append(f"{path} (lacks {', '.join(k for k in RECORD_KEYS if k not in record)})")
    if damaged:
        raise UserError(f"{len(damaged)} damaged record(s) under {directory}: {'; '.join(damaged[:3])}"
                        f"{'; ...' if len(damaged) > 3 else ''}; delete each and rerun its command (the run is "
                        f"trained again), or move it out of {directory}")
    return records


def status_of(record: dict) -> str:
    return record.get("status", COMPLETE)


def load_records(directory: str | Path) -> pd.DataFrame:
    """One row per run: experiment, run_id, status, diverged_step, spec.*, metrics.*, cost.* columns."""
    records = read_records(directory)
    if not records:
        raise UserError(f"no run records under {directory}; run `python -m bench.run --out {directory}` first")
    return records_frame(records)


def records_frame(records: list[dict]) -> pd.DataFrame:
    rows = [
        {"experiment": r["experiment"], "run_id": r.get("run_id"), "path": r["_path"], "status": status_of(r),
         "diverged_step": (r.get("divergence") or {}).get("step"),
         **{f"spec.{k}": v for k, v in r["spec"].items() if not isinstance(v, (dict, list))},
         **{f"metrics.{k}": v for k, v in r["metrics"].items()},
         **{f"cost.{k}": v for k, v in r["cost"].items()}}
        for r in records
    ]
    return pd.DataFrame(rows)


def read_record_files(paths: list[Path]) -> list[dict]:
    """The records at these paths (those a launcher just wrote)."""
    records = []
    for path in paths:
        try:
            record = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise UserError(f"record {path} is damaged ({error}); delete it and rerun the command (the run is "
                            f"trained again)") from None
        record["_path"] = str(path)
        records.append(record)
    return records
