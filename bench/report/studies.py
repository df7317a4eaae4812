"""The report of one study (bench/study.py): its tables and figures from the study's cells and their records.

`build_study_report(study, cells_with_records, out_dir)` -> (markdown, written paths, notes). `cells_with_records`
is a list of (Cell, record dict or None): None for a cell whose run has no record yet (said in a note). A record
read by bench.records carries its path (`_path`); the figure that reads a run's `.samples.npz` needs it (or
`results=`, the folder the records live under, OUT/<experiment>/<run_id>.json).

What is written depends on `study.figure`:

- "scaling": table `scaling` (arm x value of the grid axis, e.g. K, for usage, perplexity, MSE and rFID:
  mean ± std over seeds, the best arm of each column in bold) and figure `scaling` (2 x 2 panels of those four
  metrics against the axis on a log2 scale, or one row of those with values when rFID is off; one line per arm:
  the mean over seeds, the band from the smallest to the largest seed's value; usage on a log axis where it
  spans more than 20x). Where a run's effective K (record env.codebook_size; FSQ's product of levels)
  differs from its nominal K, a note says so; the figure plots it at the nominal K.
- "ablation": tables `quality` (mean ± std over seeds, bench.report.tables.summary_table) and `differences`
  (each arm minus the reference arm, paired by seed, 95% t-interval: tables.differences_table), `measurements`
  where runs carry method_stats (each key's run mean, mean ± std over seeds: MQ's flip fraction and norms), and
  figure `ablation`: per metric (MSE, rFID, perplexity, usage) the arms' means with one dot per seed, and below it
  each arm's paired difference to the reference with its 95% t-interval.
- "tuned": figure `tuning` (the validation metric of every trial, one panel per method, the winner from
  selection.json marked, diverged trials drawn at the top of the panel as a red x), table `tuned_vs_default`
  (per method: the default trial's and the winner's validation metric and the winning settings; where final-
  and default-phase test records exist, test MSE and rFID of both with the paired difference tuned - default
  and its 95% t-interval), table `final` (test metrics of the tuned settings on the final seeds, mean ± std,
  the best in bold), `final_differences` (each method minus the reference, paired by seed) and `convergence` (the
  final runs' validation MSE curves divided by their end value, mean over seeds, and the step from which each
  stays within 5% of it: where the curves flatten).
- every study: figure `codebook_features`, the encoder's features of a few test images and the K codes on the
  features' first two principal components (bench/projection.py; stored in the run's .samples.npz under
  "pca_*"), used and dead codes marked differently. One run per arm: seed 0 (else the smallest seed) of the
  grid's runs, of the final runs for a tuning study; for a scaling study one panel per arm at the axis's smallest
  and one at its largest value.

Figures are as reproducible as bench.report.figures makes them (fixed style, no time stamps): the same cells
and records give the same bytes.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullFormatter, NullLocator

from bench.report.build import slug
from bench.report.figures import PALETTE, fixed_style, samples_path, save
from bench.report.formats import to_markdown, write_table
from bench.report.runs import canonical, diverged, numeric
from bench.report.stats import fmt, mean_sd, paired_difference
from bench.report.tables import (QUALITY, Metric, Table, best_rows, default_reference, differences_table,
                                 summary_table, values_of)
from methods import palette_slots

METRIC = {m.name: m for m in QUALITY}
SCALING_METRICS = [METRIC["usage"], METRIC["perplexity"], METRIC["mse"], METRIC["rfid"]]
ABLATION_METRICS = [METRIC["mse"], METRIC["rfid"], METRIC["perplexity"], METRIC["usage"]]
TEST_METRICS = [METRIC["mse"], METRIC["rfid"]]  # tuned against default on the test split
AXIS_LABELS = {"codebook_size": "K"}
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P")
HATCHES = ("", "//", "..", "xx", "\\\\", "oo")
BAND_NOTE = "figure: line the mean over seeds, band from the smallest to the largest seed's value (min-max)"
PCA_KEYS = ("pca_features", "pca_codes", "pca_used", "pca_explained")
STUDY_STEMS = ("scaling", "quality", "differences", "measurements", "tuned_vs_default", "final", "final_differences",
               "convergence", "ablation", "tuning", "codebook_features")


# --- the cells as a runs frame ---------------------------------------------------------------------------------

def study_frame(cells_with_records, results: str | Path | None = None) -> tuple[pd.DataFrame, dict, list]:
    """-> (runs, records by path, cells without a record). runs has one row per cell with a record, in the
    columns bench.report.tables reads (method = the arm, base_method = the registered method, experiment,
    dataset, seed, path, status, diverged_step, metrics.*) plus phase, trial, point (the axes' values as a dict),
    point.NAME per axis, nominal_k (spec.codebook_size), effective_k (env.codebook_size), eval_split and
    stats.KEY per key of the record's method_stats (a method's own training measurements: MQ's finite difference)."""
    rows, records, missing = [], {}, []
    for cell, record in cells_with_records:
        spec = cell.spec
        point = dict(cell.point or {})
        base = {"method": cell.arm, "arm": cell.arm, "base_method": cell.method, "seed": int(cell.seed),
                "phase": cell.phase, "trial": cell.trial, "point": point,
                "point_key": json.dumps(point, sort_keys=True), "experiment": str(spec.experiment),
                "dataset": str(spec.dataset), "run_id": spec.run_id(), "nominal_k": spec.codebook_size,
                **{f"point.{name}": value for name, value in point.items()}}
        if record is None:
            missing.append(base)
            continue
        if record.get("_path"):
            path = str(record["_path"])
        elif results is not None:
            path = str(Path(results) / spec.experiment / f"{base['run_id']}.json")
        else:
            path = f"{spec.experiment}/{base['run_id']}.json"
        env = record.get("env") or {}
        split = (record.get("spec") or {}).get("eval_split") or env.get("eval_split")
        rows.append({**base, "path": path, "status": record.get("status", "complete"),
                     "diverged_step": (record.get("divergence") or {}).get("step"),
                     "effective_k": env.get("codebook_size"), "eval_split": split,
                     **{f"metrics.{k}": v for k, v in (record.get("metrics") or {}).items()},
                     **{f"stats.{k}": v for k, v in (record.get("method_stats") or {}).items()}})
        records[path] = record
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame = frame.sort_values(["phase", "method", "point_key", "seed", "path"], kind="stable")
        frame = frame.reset_index(drop=True)
    return frame, records, missing


def missing_note(missing: list[dict]) -> list[str]:
    if not missing:
        return []
    by_arm: dict[str, int] = {}
    for cell in missing:
        by_arm[cell["arm"]] = by_arm.get(cell["arm"], 0) + 1
    return [f"{len(missing)} cell(s) have no record yet and are left out: "
            + ", ".join(f"{arm} ({n})" for arm, n in sorted(by_arm.items()))]


def arm_styles(runs: pd.DataFrame) -> dict[str, tuple[str, str, str, str]]:
    """arm -> (colour, line style, marker, hatch): the colour is its registered method's (the same in every
    report), and arms sharing a method (ablation arms) differ by line style, marker and hatch."""
    firsts = runs.drop_duplicates("method").set_index("method")["base_method"]
    slots = palette_slots(sorted(firsts.unique()))
    styles, seen = {}, {}
    for arm in sorted(firsts.index):
        method = firsts[arm]
        i = seen.get(method, 0)
        seen[method] = i + 1
        styles[arm] = (matplotlib.colors.to_hex(PALETTE[slots[method]]), LINESTYLES[i % len(LINESTYLES)],
                       MARKERS[i % len(MARKERS)], HATCHES[i % len(HATCHES)])
    return styles


def no_values(ax, text: str = "no values") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


# --- scaling ----------------------------------------------------------------------------------------------------

def scaling_axis(runs: pd.DataFrame) -> str | None:
    """The grid axis the scaling study sweeps: codebook_size when it is one, else the only numeric one."""
    axes = sorted(c[len("point."):] for c in runs.columns if c.startswith("point."))
    if "codebook_size" in axes:
        return "codebook_size"
    numeric_axes = [a for a in axes if pd.to_numeric(runs[f"point.{a}"], errors="coerce").notna().all()]
    return numeric_axes[0] if numeric_axes else None


def with_other_axes(runs: pd.DataFrame, axis: str) -> pd.DataFrame:
    """Arms relabelled with the values of the grid's other axes ("ste (code_dim=32)"): never averaged together."""
    others = sorted(c for c in runs.columns if c.startswith("point.") and c != f"point.{axis}")
    runs = runs.copy()
    if others:
        extra = runs[others].map(canonical).apply(
            lambda row: ", ".join(f"{c[len('point.'):]}={v}" for c, v in row.items() if v != "None"), axis=1)
        runs["method"] = [f"{arm} ({e})" if e else arm for arm, e in zip(runs["arm"], extra)]
    return runs


def axis_values(runs: pd.DataFrame, axis: str) -> list:
    """The axis's values in numeric order (never text order: 64 < 256 < 1024)."""
    return sorted(runs[f"point.{axis}"].dropna().unique(), key=float)


def seed_values(runs: pd.DataFrame, metric: Metric, arm: str, value) -> pd.Series:
    """The metric of one arm at one axis value, one number per finished seed (diverged runs left out)."""
    mine = (runs["method"] == arm) & (runs["axis_value"] == value) & ~diverged(runs)
    return values_of(runs, metric)[mine].dropna()


def scaling_table(runs: pd.DataFrame, axis: str) -> Table | None:
    """Rows (metric, arm); columns the axis's values; cells mean ± std (ddof 1) over seeds, the best arm of each
    column in bold, "diverged" where every seed of the cell diverged."""
    runs = runs.assign(axis_value=runs[f"point.{axis}"])
    gone = diverged(runs)
    metrics = [m for m in SCALING_METRICS if values_of(runs, m)[~gone].notna().any()]
    if not metrics:
        return None
    label = AXIS_LABELS.get(axis, axis)
    values, arms = axis_values(runs, axis), sorted(runs["method"].unique())
    experiment, dataset = runs["experiment"].iloc[0], runs["dataset"].iloc[0]
    rows, bold, data = [], [], []
    for metric in metrics:
        cells = {arm: [] for arm in arms}
        bolds = {arm: [] for arm in arms}
        for value in values:
            seeds = {arm: seed_values(runs, metric, arm, value) for arm in arms}
            best = best_rows([s.mean() if len(s) else np.nan for s in seeds.values()], metric)
            for (arm, s), is_best in zip(seeds.items(), best):
                here = (runs["method"] == arm) & (runs["axis_value"] == value)
                text = mean_sd(s, metric.digits) if len(s) else ("diverged" if gone[here].any() else "n/a")
                if 0 < len(s) < here.sum():
                    text += f" (n={len(s)})"
                cells[arm].append(text)
                bolds[arm].append(bool(is_best))
                if here.any():
                    data.append({"experiment": experiment, "dataset": dataset, "metric": metric.name, "arm": arm,
                                 axis: value, "n": len(s), "mean": s.mean() if len(s) else np.nan,
                                 "std": s.std(ddof=1) if len(s) > 1 else np.nan,
                                 "min": s.min() if len(s) else np.nan, "max": s.max() if len(s) else np.nan,
                                 "best": bool(is_best)})
        for arm in arms:
            rows.append([metric.label, arm, *cells[arm]])
            bold.append([False, False, *bolds[arm]])
    notes = ["cells: mean ± std (ddof 1) over seeds; diverged runs are left out (n=... says how many seeds "
             "remain); the best arm of each column in bold"]
    return Table("scaling", f"{', '.join(m.label for m in metrics)} against {label} (test split)",
                 ["metric", "arm", *[f"{label} = {v}" for v in values]], rows, bold, pd.DataFrame(data), notes,
                 text_columns=2)


def effective_k_notes(runs: pd.DataFrame) -> list[str]:
    """Where a run's effective K (env.codebook_size) differs from its nominal K (spec.codebook_size)."""
    effective = pd.to_numeric(runs["effective_k"], errors="coerce") if "effective_k" in runs else None
    if effective is None:
        return []
    differs = effective.notna() & (effective != runs["nominal_k"])
    notes = []
    for arm, group in runs[differs].assign(effective=effective[differs]).groupby("method", sort=True):
        pairs = sorted({(int(n), int(e)) for n, e in zip(group["nominal_k"], group["effective"])})
        notes.append(f"{arm}: effective K differs from the nominal K ("
                     + ", ".join(f"{n} -> {e}" for n, e in pairs)
                     + "); its usage and dead codes count the effective K's codes, and the figure plots it at "
                       "the nominal K")
    return notes


def log_axis(ax, values: list, axis: str = "x") -> None:
    """A log2 axis with a tick at each value, labelled plainly (64, 256, 1024), where the values allow it."""
    numbers = [float(v) for v in values]
    if min(numbers) > 0 and max(numbers) / min(numbers) >= 4:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log", base=2)
    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_locator(FixedLocator(numbers))
    target.set_minor_locator(NullLocator())
    target.set_minor_formatter(NullFormatter())
    (ax.set_xticklabels if axis == "x" else ax.set_yticklabels)([f"{v:g}" for v in numbers])


def scaling_figure(runs: pd.DataFrame, axis: str, title: str) -> Figure | str:
    """2 x 2 panels (usage, perplexity, MSE, rFID) against the axis, or one row of those with values (a study with
    rFID off, said in the title): per arm the mean over finished seeds, and a band from the smallest to the
    largest seed's value."""
    runs = runs.assign(axis_value=runs[f"point.{axis}"])
    label = AXIS_LABELS.get(axis, axis)
    values, styles = axis_values(runs, axis), arm_styles(runs)
    shown = [m for m in SCALING_METRICS if values_of(runs, m).notna().any()]  # rFID is off in CPU studies
    absent = [m.label for m in SCALING_METRICS if m not in shown]
    if not shown:
        return "no run has usage, perplexity, MSE or rFID"
    with fixed_style():
        fig = Figure(figsize=(9.5, 6.4) if len(shown) == 4 else (4.6 * len(shown) + 1.6, 3.8), layout="constrained")
        axes = fig.subplots(2, 2).ravel() if len(shown) == 4 else fig.subplots(1, len(shown), squeeze=False).ravel()
        for ax, metric in zip(axes, shown):
            drawn = False
            for arm, (colour, linestyle, marker, _) in styles.items():
                stats = []
                for value in values:
                    s = seed_values(runs, metric, arm, value)
                    if len(s):
                        stats.append((float(value), s.mean(), s.min(), s.max(), len(s)))
                if not stats:
                    continue
                x, mean, low, high, n = map(np.array, zip(*stats))
                ax.plot(x, mean, color=colour, linestyle=linestyle, marker=marker, markersize=3.5, label=arm)
                if (n > 1).any():
                    ax.fill_between(x, low, high, color=colour, alpha=0.18, linewidth=0)
                drawn = True
            if not drawn:
                no_values(ax)
                ax.set_title(f"{metric.label}: no values")
                continue
            if metric.name == "perplexity" and axis == "codebook_size":
                ax.plot([float(v) for v in values], [float(v) for v in values], color="grey", linestyle="--",
                        linewidth=0.8, label="K (every code equally used)")
                ax.set_yscale("log", base=2)
                ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
            elif metric.name == "usage":  # from 1/K (collapse) to 1: collapsed arms stay apart on a log axis
                shown_values = values_of(runs, metric).dropna()
                if (shown_values > 0).all() and shown_values.max() / shown_values.min() > 20:
                    ax.set_yscale("log")
            log_axis(ax, values)
            ax.set_xlabel(label)
            ax.set_ylabel(f"test {metric.label} ({'higher' if metric.better > 0 else 'lower'} is better)")
        handles, labels = [], []
        for ax in axes:
            for h, l in zip(*ax.get_legend_handles_labels()):
                if l not in labels:
                    handles.append(h)
                    labels.append(l)
        fig.legend(handles, labels, loc="outside right upper")
        fig.suptitle(f"{title}: against {label}\nline: mean over seeds; band: min-max over seeds"
                     + (f" ({', '.join(absent)} not measured)" if absent else ""))
    return fig


# --- ablation ---------------------------------------------------------------------------------------------------

def measurements_table(runs: pd.DataFrame) -> Table | None:
    """The methods' own training measurements (record method_stats: run means), mean ± std over seeds per arm;
    None where no run has any. An arm whose runs predate the measurements reads n/a."""
    keys = sorted(c for c in runs.columns if c.startswith("stats.") and runs[c].notna().any())
    if not keys:
        return None
    metrics = [Metric(key, key.split(".", 1)[1], 0, 4) for key in keys]
    table = summary_table(runs, metrics, "measurements", "the methods' training measurements (method_stats: run "
                                                          "means), mean ± std over seeds")
    table.notes.append("n/a: the arm's records carry no such measurement (the method has none, or its runs predate it)")
    return table


def ablation_figure(runs: pd.DataFrame, reference: str, title: str) -> Figure | str:
    """Top row: each arm's mean (bar) and seeds (dots) per metric; bottom row: each arm minus the reference,
    paired by seed, with its 95% t-interval (bench.report.stats.paired_difference)."""
    metrics = [m for m in ABLATION_METRICS if values_of(runs, m).notna().any()]
    if not metrics:
        return "no run has MSE, rFID, perplexity or usage"
    arms, styles = sorted(runs["method"].unique()), arm_styles(runs)
    others = [a for a in arms if a != reference]
    by_seed = lambda arm, metric: values_of(runs, metric)[runs["method"] == arm].set_axis(  # noqa: E731
        runs.loc[runs["method"] == arm, "seed"])
    with fixed_style():
        fig = Figure(figsize=(max(6.0, len(metrics) * (0.55 * len(arms) + 1.4)), 6.0), layout="constrained")
        axes = fig.subplots(2, len(metrics), squeeze=False)
        for column, metric in enumerate(metrics):
            top, bottom = axes[0, column], axes[1, column]
            for x, arm in enumerate(arms):
                colour, _, _, hatch = styles[arm]
                seeds = by_seed(arm, metric).dropna()
                if seeds.empty:
                    continue
                top.bar(x, seeds.mean(), color=colour, hatch=hatch, edgecolor="black", linewidth=0.5)
                top.scatter(np.full(len(seeds), x + 0.22), seeds, s=8, color="black", zorder=3)
            top.set_xticks(range(len(arms)), arms, rotation=30, ha="right")
            top.set_ylabel(f"test {metric.label}")
            top.set_title(f"{metric.label} ({'higher' if metric.better > 0 else 'lower'} is better)")
            for x, arm in enumerate(others):
                colour = styles[arm][0]
                d = paired_difference(by_seed(arm, metric), by_seed(reference, metric))
                if d.mean is None:
                    bottom.text(x, 0, "n/a", ha="center", va="bottom")
                    continue
                bottom.errorbar([x], [d.mean], yerr=[[d.mean - d.low], [d.high - d.mean]], fmt="o", color=colour,
                                ecolor="black", capsize=4, markersize=6, markeredgecolor="black",
                                label=f"{arm} - {reference}")
            bottom.axhline(0.0, color="grey", linewidth=0.8)
            bottom.set_xticks(range(len(others)), others, rotation=30, ha="right")
            bottom.set_xlim(-0.6, max(len(others), 1) - 0.4)
            bottom.set_ylabel(f"Δ {metric.label} vs {reference}")
        fig.suptitle(f"{title}: arms against {reference}\ntop: mean over seeds (bars), seeds (dots)\n"
                     f"bottom: arm − {reference}, paired by seed, with its 95% t-interval")
    return fig


# --- tuning -----------------------------------------------------------------------------------------------------

def read_selection(selection) -> dict | None:
    """selection.json's content from a dict, a path (None when the file is absent) or None."""
    if selection is None or isinstance(selection, dict):
        return selection
    path = Path(selection)
    return json.loads(path.read_text()) if path.is_file() else None


def settings_text(settings: dict | None) -> str:
    if not settings:
        return "(defaults)"
    return ", ".join(f"{k}={canonical(v)}" for k, v in sorted(settings.items()))


def trials_from_records(runs: pd.DataFrame, metric: Metric) -> dict:
    """selection.json's "methods" rebuilt from the trial records (when there is no selection.json): each trial's
    validation metric (the mean over its records), the winner the best complete one (ties: the lower trial)."""
    methods = {}
    trials = runs[runs["phase"] == "trial"]
    for method, group in trials.groupby("base_method", sort=True):
        rows = []
        for trial, mine in group.groupby("trial", sort=True):
            values = values_of(mine, metric)[~diverged(mine)].dropna()
            status = "complete" if len(values) else ("diverged" if diverged(mine).any() else "missing")
            rows.append({"trial": int(trial), "settings": None, "run_id": mine["run_id"].iloc[0], "status": status,
                         "value": float(values.mean()) if len(values) else None})
        done = [r for r in rows if r["value"] is not None]
        sign = 1 if metric.better > 0 else -1
        winner = max(done, key=lambda r: (sign * r["value"], -r["trial"]))["trial"] if done else None
        methods[method] = {"winner": winner, "trials": rows}
    return methods


def tuning_figure(selection: dict, metric: Metric, title: str) -> Figure | str:
    """One panel per method: the validation metric of each trial against the trial number; trial 0 (the method's
    defaults) a square, the winner a star labelled "winner", diverged trials a red x at the top of the panel
    (above the worst finished trial), missing trials counted in the panel's title."""
    methods = sorted(selection.get("methods") or {})
    if not methods:
        return "selection.json lists no method"
    slots = palette_slots(methods)
    columns = min(4, len(methods))
    lines = math.ceil(len(methods) / columns)
    direction = "higher" if metric.better > 0 else "lower"
    with fixed_style():
        fig = Figure(figsize=(3.0 * columns + 0.4, 2.7 * lines + 0.6), layout="constrained")
        axes = fig.subplots(lines, columns, squeeze=False).ravel()
        for ax in axes[len(methods):]:
            ax.set_visible(False)
        for ax, method in zip(axes, methods):
            colour = matplotlib.colors.to_hex(PALETTE[slots[method]])
            entry = selection["methods"][method]
            trials = sorted(entry.get("trials") or [], key=lambda t: t["trial"])
            done = [t for t in trials if t.get("status") == "complete" and t.get("value") is not None]
            gone = [t for t in trials if t.get("status") == "diverged"]
            lost = [t for t in trials if t not in done and t not in gone]
            if not done:
                no_values(ax, "no trial finished")
            else:
                x = np.array([t["trial"] for t in done], dtype=float)
                y = np.array([t["value"] for t in done], dtype=float)
                positive = (y > 0).all()
                log = positive and y.max() / y.min() > 20
                ax.scatter(x, y, color=colour, edgecolor="black", linewidth=0.4, s=22, zorder=3, label="trial")
                default = [t for t in done if t["trial"] == 0]
                if default:
                    ax.scatter([0], [default[0]["value"]], marker="s", facecolor="none", edgecolor="black", s=70,
                               zorder=4, label="defaults (trial 0)")
                    ax.axhline(default[0]["value"], color="grey", linestyle=":", linewidth=0.8)
                winner = [t for t in done if t["trial"] == entry.get("winner")]
                if winner:
                    ax.scatter([winner[0]["trial"]], [winner[0]["value"]], marker="*", s=190, color=colour,
                               edgecolor="black", linewidth=0.8, zorder=5, label="winner")
                if gone:
                    worst, best = (y.min(), y.max()) if metric.better > 0 else (y.max(), y.min())
                    if log:
                        top = worst * (worst / best) ** 0.15 if worst != best else worst * 1.5
                    else:
                        span = abs(worst - best) or abs(worst) or 1.0
                        top = worst + (0.15 * span if metric.better <= 0 else -0.15 * span)
                    ax.scatter([t["trial"] for t in gone], np.full(len(gone), top), marker="x", color="red", s=40,
                               linewidth=1.4, zorder=4, label="diverged")
                if log:
                    ax.set_yscale("log")
            ax.xaxis.set_major_locator(FixedLocator([t["trial"] for t in trials] or [0]))
            ax.set_xlabel("trial (0: the method's defaults)")
            ax.set_ylabel(f"validation {metric.label}")
            counts = f"{len(done)} of {len(trials)} finished" + (f", {len(gone)} diverged" if gone else "") + (
                f", {len(lost)} missing" if lost else "")
            ax.set_title(f"{method}: winner trial {entry.get('winner')}\n{counts}")
        handles = [Line2D([], [], marker="o", linestyle="", color="grey", markeredgecolor="black", label="trial"),
                   Line2D([], [], marker="s", linestyle="", markerfacecolor="none", markeredgecolor="black",
                          label="defaults (trial 0)"),
                   Line2D([], [], marker="*", linestyle="", color="grey", markeredgecolor="black", markersize=11,
                          label="winner (selection.json)"),
                   Line2D([], [], marker="x", linestyle="", color="red", label="diverged (drawn at the top)")]
        fig.legend(handles=handles, loc="outside lower center", ncols=4)
        fig.suptitle(f"{title}: validation {metric.label} of every trial ({direction} is better)")
    return fig


def tuned_table(selection: dict, runs: pd.DataFrame, metric: Metric) -> Table:
    """Per method: trials finished, the default trial's and the winner's validation metric, the winner and its
    settings; where final- and default-phase records exist, their test MSE and rFID (mean ± std over seeds) and the
    paired difference tuned - default with its 95% t-interval (bold where it excludes 0)."""
    methods = sorted(selection.get("methods") or {})
    test_runs = runs[runs["phase"].isin(["final", "default"])] if not runs.empty else runs
    tests = [m for m in TEST_METRICS if not test_runs.empty and values_of(test_runs, m).notna().any()
             and set(test_runs["phase"]) == {"final", "default"}]
    header = ["method", "winning settings", "trials finished", f"val {metric.label} defaults",
              f"val {metric.label} tuned", "winner"]
    for m in tests:
        header += [f"test {m.label} defaults", f"test {m.label} tuned", f"Δ {m.label} (95% CI)"]
    rows, bold, data = [], [], []
    for method in methods:
        entry = selection["methods"][method]
        trials = {t["trial"]: t for t in entry.get("trials") or []}
        winner = entry.get("winner")
        default_value, winner_value = (trials.get(0) or {}).get("value"), (trials.get(winner) or {}).get("value")
        finished = sum(t.get("status") == "complete" for t in trials.values())
        gone = sum(t.get("status") == "diverged" for t in trials.values())
        settings = (trials.get(winner) or {}).get("settings") if winner is not None else None
        improved = (default_value is not None and winner_value is not None
                    and round(winner_value, metric.digits + 1) != round(default_value, metric.digits + 1))
        row = [method, settings_text(settings) if winner is not None else "no winner",
               f"{finished} of {len(trials)}" + (f" ({gone} diverged)" if gone else ""),
               fmt(default_value, metric.digits + 1), fmt(winner_value, metric.digits + 1),
               "n/a" if winner is None else str(winner)]
        flags = [False, False, False, False, bool(improved), False]
        item = {"method": method, "winner": winner, "settings": json.dumps(settings, sort_keys=True),
                "trials": len(trials), "finished": finished, "diverged": gone, "metric": metric.name,
                "val_default": default_value, "val_tuned": winner_value}
        for m in tests:
            by_seed = {}
            for phase in ("default", "final"):
                mine = test_runs[(test_runs["base_method"] == method) & (test_runs["phase"] == phase)]
                by_seed[phase] = values_of(mine, m).mask(diverged(mine)).set_axis(mine["seed"])
            d = paired_difference(by_seed["final"], by_seed["default"])
            digits = m.digits + 1
            interval = "n/a" if d.mean is None else (
                f"{fmt(d.mean, digits, True)} [{fmt(d.low, digits, True)}, {fmt(d.high, digits, True)}]")
            row += [mean_sd(by_seed["default"].dropna(), m.digits), mean_sd(by_seed["final"].dropna(), m.digits),
                    interval]
            flags += [False, False, bool(d.excludes_zero)]
            item.update({f"test_{m.name}_default": by_seed["default"].mean(),
                         f"test_{m.name}_tuned": by_seed["final"].mean(), f"test_{m.name}_diff": d.mean,
                         f"test_{m.name}_ci_low": d.low, f"test_{m.name}_ci_high": d.high,
                         f"test_{m.name}_paired_seeds": d.n})
        rows.append(row)
        bold.append(flags)
        data.append(item)
    notes = [f"val: the validation split's {metric.label} of the tuning trials (selection.json); trial 0 is the "
             "method's defaults, the winner the trial selection.json names (bold: it differs from the defaults)"]
    if selection.get("rule"):
        notes.append(f"selection rule: {selection['rule']}")
    if tests:
        notes.append("test: the tuned settings (phase final) and the defaults (phase default) on the final seeds; "
                     "Δ = mean over seeds of (tuned − default) on the same seed, 95% t-interval, bold where it "
                     "excludes 0; n/a below 2 paired seeds")
    return Table("tuned_vs_default", "tuned against default settings", header, rows, bold, pd.DataFrame(data),
                 notes, text_columns=2)


FLAT_WITHIN = 0.05  # a curve counts as flat from the first evaluation after which it stays within 5% of its end


def convergence_table(runs: pd.DataFrame, records: dict, phase: str = "final") -> Table | None:
    """Per method: the validation MSE curve of the phase's runs (record curves, evaluated every eval_every steps)
    divided by its value at the run's last evaluation, mean over seeds, one column per step; and the first step
    from which the mean ratio stays within FLAT_WITHIN of 1 ("flat from"). None without curves."""
    mine = runs[(runs["phase"] == phase) & ~diverged(runs)] if not runs.empty else runs
    ratios: dict[str, list[dict[int, float]]] = {}
    for method, path in zip(mine.get("base_method", []), mine.get("path", [])):
        points = {int(row["step"]): row["mse"] for row in (records.get(path) or {}).get("curves") or []
                  if row.get("mse") is not None and math.isfinite(row["mse"])}
        if len(points) < 2 or not points[max(points)] > 0:
            continue
        end = points[max(points)]
        ratios.setdefault(method, []).append({step: value / end for step, value in points.items()})
    if not ratios:
        return None
    steps = sorted({step for runs_of in ratios.values() for curve in runs_of for step in curve})
    rows, bold, data = [], [], []
    for method in sorted(ratios):
        means = {step: float(np.mean([c[step] for c in ratios[method] if step in c]))
                 for step in steps if any(step in c for c in ratios[method])}
        flat = next((step for step in sorted(means) if all(abs(means[later] - 1) <= FLAT_WITHIN
                                                          for later in means if later >= step)), None)
        rows.append([method, str(len(ratios[method]))] + [fmt(means.get(step), 3) for step in steps]
                    + [str(flat) if flat is not None else "n/a"])
        bold.append([False] * (len(steps) + 3))
        data += [{"method": method, "step": step, "ratio_to_end": value, "seeds": len(ratios[method]),
                  "flat_from": flat} for step, value in means.items()]
    notes = [f"validation MSE at each evaluation divided by the same run's value at its last evaluation, mean over "
             f"the {phase} runs' seeds (1.000 at the end); flat from: the first step after which the mean stays "
             f"within {FLAT_WITHIN:.0%} of the end value (the cosine learning rate reaches 0 at the end, which "
             "flattens every curve; a large ratio shortly before the end says more steps would still help)"]
    return Table("convergence", f"validation curves of the {phase} runs relative to their end",
                 ["method", "seeds"] + [f"step {step}" for step in steps] + ["flat from"], rows, bold,
                 pd.DataFrame(data), notes)


def split_notes(runs: pd.DataFrame) -> list[str]:
    """Records whose evaluation split is not the one their phase needs (trials: val; final/default: test)."""
    if runs.empty or "eval_split" not in runs:
        return []
    notes = []
    for phase, wanted in (("trial", "val"), ("final", "test"), ("default", "test")):
        mine = runs[(runs["phase"] == phase) & runs["eval_split"].notna()]
        wrong = mine[mine["eval_split"] != wanted]
        if len(wrong):
            splits = ", ".join(sorted(set(wrong["eval_split"])))
            notes.append(f"{len(wrong)} {phase} record(s) were evaluated on {splits}, not {wanted}: "
                         + ", ".join(sorted(wrong["run_id"])[:3]))
    return notes


# --- codebook versus features -----------------------------------------------------------------------------------

def chosen_runs(runs: pd.DataFrame, figure: str) -> pd.DataFrame:
    """The runs the codebook figure shows: per arm the run of seed 0, else of the smallest seed; for a scaling
    study one at the axis's smallest and one at its largest value (where dead codes are fewest and most: 17
    methods x every K would be too many panels); a tuning study's final runs (the tuned settings), else its grid
    runs."""
    pool = runs[runs["phase"] == "final"] if (runs["phase"] == "final").any() else runs[runs["phase"] != "trial"]
    if pool.empty:
        pool = runs
    scaling = figure == "scaling" and "axis_value" in pool
    if scaling:
        ends = sorted(pool["axis_value"].unique(), key=float)
        pool = pool[pool["axis_value"].isin({ends[0], ends[-1]})]
    keys = ["method", "axis_value"] if scaling else ["method"]
    order = [*keys, "trial", "seed", "path"] if "trial" in pool else [*keys, "seed", "path"]  # trials: 0 first
    picked = pool.sort_values(order, kind="stable").groupby(keys, sort=True).head(1)
    return picked.reset_index(drop=True)


def read_projection(record_path: str) -> dict | str:
    path = samples_path(record_path)
    if not path.is_file():
        return f"no {path.name}"
    with np.load(path, allow_pickle=False) as samples:
        if not all(key in samples for key in PCA_KEYS):
            return f"{path.name} holds no pca_* arrays"
        data = {key: samples[key] for key in samples.files if key.startswith("pca_")}
    return data


def codebook_figure(runs: pd.DataFrame, axis: str | None, title: str) -> tuple[Figure | str, list[str]]:
    """One panel per chosen run (chosen_runs): the features of its test images (grey dots) and its K codes (used:
    filled in the arm's colour; dead: black x) on the features' first two principal components. For a scaling
    study (axis given) rows are arms and columns the axis's values."""
    figure = "scaling" if axis else ""
    picked = chosen_runs(runs, figure)
    panels, notes, how = [], [], set()
    for run in picked.itertuples(index=False):
        data = read_projection(run.path) if run.status != "diverged" else "diverged"
        if isinstance(data, str):
            notes.append(f"codebook_features: {run.method} seed {run.seed}"
                         + (f" at {run.axis_value}" if figure == "scaling" else "") + f" left out ({data})")
            continue
        if "pca_note" in data:
            how.add(str(data["pca_note"]))
        panels.append((run, data))
    if not panels:
        return "no chosen run has pca_* arrays in its .samples.npz", notes
    styles = arm_styles(runs)
    if figure == "scaling":
        arms = sorted({run.method for run, _ in panels})
        values = sorted({run.axis_value for run, _ in panels}, key=float)
        # an arm's panels side by side, as many arms to a line as fit in about four panels: a page, not a scroll
        arms_per_line = max(1, 4 // len(values))
        place = {(run.method, run.axis_value): divmod(arms.index(run.method), arms_per_line)
                 for run, _ in panels}
        place = {key: (line, slot * len(values) + values.index(key[1])) for key, (line, slot) in place.items()}
        lines, columns = math.ceil(len(arms) / arms_per_line), arms_per_line * len(values)
        position = lambda run: place[run.method, run.axis_value]  # noqa: E731
    else:
        columns = min(4, len(panels))
        lines = math.ceil(len(panels) / columns)
        order = {id(run): i for i, (run, _) in enumerate(panels)}
        position = lambda run: divmod(order[id(run)], columns)  # noqa: E731
    with fixed_style():
        fig = Figure(figsize=(2.7 * columns + 0.3, 2.6 * lines + 0.8), layout="constrained")
        axes = fig.subplots(lines, columns, squeeze=False)
        used_axes = set()
        for run, data in panels:
            line, column = position(run)
            used_axes.add((line, column))
            ax = axes[line, column]
            features = data["pca_features"].astype(np.float64)
            codes = data["pca_codes"].astype(np.float64)
            used = data["pca_used"].astype(bool)
            explained = data["pca_explained"].astype(np.float64)
            colour = styles[run.method][0]
            ax.scatter(features[:, 0], features[:, 1], s=2, color="0.6", alpha=0.35, linewidth=0,
                       label="features", rasterized=True)
            ax.scatter(codes[~used, 0], codes[~used, 1], marker="x", s=12, color="black", linewidth=0.6,
                       label="dead code", rasterized=True)  # up to 65536 codes: an image inside the PDF
            ax.scatter(codes[used, 0], codes[used, 1], s=14, color=colour, edgecolor="black", linewidth=0.3,
                       label="used code", rasterized=True)
            where = f", {AXIS_LABELS.get(axis, axis)}={run.axis_value}" if axis else ""
            ax.set_title(f"{run.method}{where}, seed {run.seed}\n{int(used.sum())} of {len(used)} codes used",
                         fontsize=8)
            ax.set_xlabel(f"PC1 ({explained[0]:.0%})")
            ax.set_ylabel(f"PC2 ({explained[1]:.0%})")
        for line in range(lines):
            for column in range(columns):
                if (line, column) not in used_axes:
                    axes[line, column].set_visible(False)
        handles = [Line2D([], [], marker="o", linestyle="", color="0.6", label="features (test latents)"),
                   Line2D([], [], marker="o", linestyle="", color="grey", markeredgecolor="black",
                          label="used code (arm's colour)"),
                   Line2D([], [], marker="x", linestyle="", color="black",
                          label="dead code (unused on the test split)")]
        fig.legend(handles=handles, loc="outside lower center", ncols=3 if columns > 1 else 1)
        fig.suptitle(f"{title}: codebook versus features\n(first two principal components of the features)")
    notes.append("codebook_features: one run per arm" + (" at the smallest and at the largest "
                                                          f"{AXIS_LABELS.get(axis, axis)}" if axis else "")
                 + ": seed 0, else the smallest seed" + (", of the final (tuned) runs" if (runs["phase"] == "final")
                                                         .any() else "")
                 + "; PCA of a few test images' latents, the codes projected into it; used/dead from the whole "
                   "test split's code histogram")
    notes += [f"codebook_features: {text}" for text in sorted(how)]
    return fig, notes


# --- the report ---------------------------------------------------------------------------------------------------

def build_study_report(study, cells_with_records, out_dir: str | Path, *, selection=None,
                       results: str | Path | None = None, figures: bool = True) -> tuple[str, list[Path], list[str]]:
    """Write the study's tables (markdown, LaTeX, CSV) and figures (PNG, PDF) into out_dir, and out_dir/report.md
    -> (markdown, written paths, notes). selection: selection.json's content or path for a tuning study
    (default: out_dir/selection.json, else out_dir/../selection.json, the study's folder when out_dir is its
    report/; without either, the trials' values and winners are rebuilt from the trial records, with a note).
    results: where records without a `_path` live (OUT/<experiment>/<run_id>.json), to find their .samples.npz.
    figures=False: tables only (nothing is drawn; earlier figures in out_dir are left as they are)."""
    out = Path(out_dir)
    runs, records, missing = study_frame(cells_with_records, results)
    notes = missing_note(missing)
    title = f"study {study.name}"
    tables: list[Table] = []
    plots: list[tuple[str, Callable[[], Figure | str]]] = []  # drawn only when figures is true
    if runs.empty:
        notes.append("no cell has a record yet: nothing to report")
    elif study.figure == "scaling":
        axis = scaling_axis(runs)
        if axis is None:
            notes.append("skipped scaling: the study's cells have no numeric grid axis")
        else:
            runs = with_other_axes(runs, axis).assign(axis_value=lambda r: r[f"point.{axis}"])
            table = scaling_table(runs, axis)
            if table is not None:
                table.notes += effective_k_notes(runs) + [BAND_NOTE]
                tables.append(table)
            else:
                notes.append("skipped table scaling: no metric has values")
            plots.append(("scaling", lambda r=runs, a=axis: scaling_figure(r, a, title)))
            if table is None:
                notes += effective_k_notes(runs)
    elif study.figure == "ablation":
        arms = sorted(runs["method"].unique())
        reference = study.reference_arm or default_reference(arms)
        if study.reference_arm is None:
            notes.append(f"the study names no reference arm: {reference}")
        points = sorted(runs["point_key"].unique())
        for key in points:  # a grid with axes: one set of tables and one figure per point, never averaged over
            here = runs[runs["point_key"] == key].reset_index(drop=True)
            where = ", ".join(f"{k}={canonical(v)}" for k, v in json.loads(key).items()) if len(points) > 1 else ""
            suffix = "_" + slug(where.replace(", ", "_").replace("=", "-")) if where else ""
            at = f" at {where}" if where else ""
            quality = summary_table(here, QUALITY, "quality", "quality (test split), mean ± std over seeds")
            if quality is not None:
                quality.name, quality.title = quality.name + suffix, quality.title + at
                tables.append(quality)
            present = sorted(here["method"].unique())
            if reference not in present:
                notes.append(f"skipped differences and ablation{at}: reference arm {reference!r} has no runs; arms: "
                             f"{', '.join(present)}")
            elif len(present) < 2:
                notes.append(f"skipped differences and ablation{at}: only one arm")
            else:
                differences = differences_table(here, reference)
                if differences is not None:
                    differences.name, differences.title = differences.name + suffix, differences.title + at
                    tables.append(differences)
                measured = measurements_table(here)
                if measured is not None:
                    measured.name, measured.title = measured.name + suffix, measured.title + at
                    tables.append(measured)
                plots.append((f"ablation{suffix}", lambda r=here, a=reference, t=title + at: ablation_figure(r, a, t)))
    elif study.figure == "tuned":
        metric = METRIC.get(getattr(study, "select_metric", "mse"), METRIC["mse"])
        chosen = read_selection(selection if selection is not None else next(
            (p for p in (out / "selection.json", out.parent / "selection.json") if p.is_file()), None))
        if chosen is None:
            chosen = {"metric": metric.name, "split": "val", "methods": trials_from_records(runs, metric)}
            notes.append("no selection.json: each method's trials and winner rebuilt from the trial records (the "
                         f"best validation {metric.label})")
        else:
            metric = METRIC.get(chosen.get("metric", metric.name), metric)
        plots.append(("tuning", lambda c=chosen, m=metric: tuning_figure(c, m, title)))
        defaults_won = sorted(m for m, e in (chosen.get("methods") or {}).items() if e.get("winner") == 0)
        if defaults_won:
            notes.append(f"the defaults won for {', '.join(defaults_won)}: their final runs are their default runs")
        tables.append(tuned_table(chosen, runs, metric))
        final = runs[runs["phase"] == "final"].reset_index(drop=True)
        if final.empty:
            notes.append("skipped final: no final-phase record yet")
        else:
            final = final.assign(method=final["base_method"])
            tables.append(summary_table(final, QUALITY, "final",
                                        "test metrics of the tuned settings, mean ± std over the final seeds"))
            labels = sorted(final["method"].unique())
            reference = study.reference_arm if study.reference_arm in labels else default_reference(labels)
            if len(labels) > 1:
                differences = differences_table(final, reference)
                if differences is not None:
                    differences.name = "final_differences"
                    differences.title = f"tuned settings: differences to {reference} (paired by seed)"
                    tables.append(differences)
            tables.append(convergence_table(runs, records))
        notes += split_notes(runs)
    else:
        notes.append(f"unknown study figure {study.figure!r}: only the codebook figure is drawn")
    if not runs.empty and figures:
        axis = scaling_axis(runs) if study.figure == "scaling" else None
        if study.figure == "scaling" and axis is not None and "axis_value" not in runs:
            runs = runs.assign(axis_value=runs[f"point.{axis}"])
        fig, figure_notes = codebook_figure(runs, axis, title)
        plots.append(("codebook_features", lambda f=fig: f))
        notes += figure_notes

    written: list[Path] = []
    tables = [t for t in tables if t is not None]
    for table in tables:
        written += write_table(table, out)
    shown = []
    for stem, make in plots if figures else []:
        fig = make()
        if isinstance(fig, str):
            notes.append(f"skipped figure {stem}: {fig}")
            continue
        written += save(fig, out / stem)
        shown.append(stem)
    if figures:
        remove_stale_study(out, written)
    markdown = "\n\n".join(
        [f"## {title} ({study.kind}, {study.figure})"]
        + [to_markdown(t) for t in tables]
        + [f"![{stem}]({stem}.png)" for stem in shown]
        + ([("notes:\n\n" + "\n".join(f"- {n}" for n in notes))] if notes else [])) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "report.md", "w", encoding="utf-8", newline="\n") as f:
        f.write(markdown)
    return markdown, [out / "report.md"] + written, notes


def remove_stale_study(folder: Path, written: list[Path]) -> None:
    """Delete what an earlier study report wrote into folder and this one did not (only the report's names)."""
    keep = set(written)
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        ours = path.stem in STUDY_STEMS or path.stem.startswith(
            ("quality_", "differences_", "measurements_", "ablation_"))
        if path.is_file() and ours and path.suffix in (".md", ".tex", ".csv", ".png", ".pdf") and path not in keep:
            path.unlink()
