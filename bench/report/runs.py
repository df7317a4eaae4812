"""Records -> the runs DataFrame that every table and figure reads.

One row per (experiment, dataset, method label, seed) with columns experiment, dataset, method (the label),
base_method, seed, path, status ("complete" or "diverged"), diverged_step, metrics.*, cost.*, spec.* (nested
options as spec.method_options.NAME). A diverged run stays a row: its metrics are null, and the tables say so.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from bench.records import load_records, read_records
from bench.spec import RunSpec

# Fields that do not tell two configurations of a method apart (the group keys, the seed, how it ran).
NOT_IDENTITY = {"spec.seed", "spec.method", "spec.dataset", "spec.experiment"} | {
    f"spec.{name}" for name in RunSpec.RUNTIME_FIELDS}


def load(directory: str | Path) -> tuple[pd.DataFrame, dict[str, dict]]:
    """(one row per run, the raw records by path). Nested spec values (method_options, model_options) become
    spec.method_options.NAME columns. Raises UserError when there is no record."""
    frame = load_records(directory)
    records = {r["_path"]: r for r in read_records(directory)}
    nested = pd.DataFrame([
        {f"spec.{key}.{name}": value for key, options in records[path]["spec"].items() if isinstance(options, dict)
         for name, value in options.items()}
        for path in frame["path"]], index=frame.index)
    frame = pd.concat([frame, nested], axis=1)
    defaults = RunSpec.from_dict({"method": "ste"}).to_dict()
    for name in RunSpec.ADDED_FIELDS:  # a record older than the field ran at its default: it reads the same
        column = f"spec.{name}"
        value = defaults[name]
        if column not in frame:
            frame[column] = [value] * len(frame)
        else:
            frame[column] = [value if canonical(v) == "None" and value is not None else v for v in frame[column]]
    return frame, records


def canonical(value) -> str:
    """A spec value as comparable text (None and NaN, from a field a record lacks, read the same)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "None"
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def method_labels(frame: pd.DataFrame) -> pd.Series:
    """The method name, or where runs of one method in one (experiment, dataset) differ in more than the seed,
    the name plus what differs: "mq (outer_every=2)". Different configurations are never averaged together."""
    columns = sorted(c for c in frame if c.startswith("spec.") and c not in NOT_IDENTITY)
    text = frame[columns].map(canonical) if columns else pd.DataFrame(index=frame.index)
    labels = frame["spec.method"].astype(str).copy()
    for (_, _, method), index in frame.groupby(["experiment", "spec.dataset", "spec.method"]).groups.items():
        varying = [c for c in columns if text.loc[index, c].nunique() > 1]
        for i in index:
            if varying:
                short = lambda c: c.split(".")[-1]  # noqa: E731
                labels[i] = f"{method} (" + ", ".join(f"{short(c)}={text.at[i, c]}" for c in varying) + ")"
    return labels


def prepare(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """-> (runs, notes). runs: one row per (experiment, dataset, method label, seed) with columns experiment,
    dataset, method (the label), base_method, seed, path, metrics.*, cost.*; sorted. A second record of the
    same run (a copy in another folder) is dropped, with a note."""
    runs = frame.copy()
    runs["method"] = method_labels(frame)
    runs["base_method"] = frame["spec.method"].astype(str)
    runs["dataset"] = frame["spec.dataset"].astype(str)
    runs["experiment"] = frame["experiment"].astype(str)
    runs["seed"] = pd.to_numeric(frame["spec.seed"]).astype(int)
    runs = runs.sort_values(["experiment", "dataset", "method", "seed", "path"], kind="stable")
    key = ["experiment", "dataset", "method", "seed"]
    duplicated = runs.duplicated(key, keep="first")
    notes = [f"ignored {path}: the same run as another record" for path in runs.loc[duplicated, "path"]]
    return runs[~duplicated].reset_index(drop=True), notes


def groups(runs: pd.DataFrame):
    """((experiment, dataset), runs of that group), sorted."""
    for key, group in runs.groupby(["experiment", "dataset"], sort=True):
        yield key, group.reset_index(drop=True)


def numeric(runs: pd.DataFrame, column: str) -> pd.Series:
    """The column as numbers (null where a run lacks it or holds no number); all null where no run has it."""
    if column not in runs:
        return pd.Series(np.nan, index=runs.index)
    return pd.to_numeric(runs[column], errors="coerce")


def diverged(runs: pd.DataFrame) -> pd.Series:
    """Which runs diverged (status "diverged"; records without a status are complete runs)."""
    if "status" not in runs:
        return pd.Series(False, index=runs.index)
    return runs["status"].eq("diverged")


def diverged_steps(runs: pd.DataFrame) -> list[str]:
    """The steps at which these runs diverged, by seed ("?" where a record lacks it); empty when none did."""
    gone = runs[diverged(runs)].sort_values("seed")
    return [str(int(s)) if pd.notna(s) else "?" for s in gone["diverged_step"]]


def divergence_text(runs: pd.DataFrame, of: bool = False) -> str:
    """'' when none of these runs (one method's) diverged, else "k (step s)" or "k (steps s1, s2)"; with `of`,
    "k of n (...)"."""
    steps = diverged_steps(runs)
    if not steps:
        return ""
    count = f"{len(steps)} of {len(runs)}" if of else str(len(steps))
    return f"{count} (step{'s' if len(steps) > 1 else ''} {', '.join(steps)})"


def null_reasons(runs: pd.DataFrame, records: dict[str, dict]) -> dict[str, list[str]]:
    """metric column -> the distinct reasons the group's records give for its nulls."""
    reasons: dict[str, set[str]] = {}
    for path in runs["path"]:
        for name, reason in (records.get(path, {}).get("null_reasons") or {}).items():
            reasons.setdefault(f"metrics.{name}", set()).add(str(reason))
    return {column: sorted(texts) for column, texts in reasons.items()}
