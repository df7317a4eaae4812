"""The report's tables, each for one (experiment, dataset) group of runs (a DataFrame from runs.prepare):
quality and cost (mean ± std over seeds, the best in bold), differences to a reference method (paired by seed,
with a 95% t-interval) and validation MSE at equal training time. A Table holds text cells and the numbers
behind them; formats.py writes it as markdown, LaTeX and CSV."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from bench.report.runs import diverged, divergence_text, numeric
from bench.report.stats import fmt, mean_sd, paired_difference
from methods import reference_method


@dataclass(frozen=True)
class Metric:
    column: str
    label: str
    better: int  # +1: higher is better, -1: lower is better, 0: neither (no best is marked)
    digits: int
    scale: float = 1.0  # shown as value * scale (parameters in millions)
    caveat: str = ""  # said under every table that shows the metric

    @property
    def name(self) -> str:
        return self.column.split(".", 1)[1]


QUALITY = [
    Metric("metrics.mse", "MSE", -1, 5),
    Metric("metrics.psnr", "PSNR (dB)", +1, 2),
    Metric("metrics.ssim", "SSIM", +1, 3),
    Metric("metrics.perplexity", "perplexity", +1, 1),
    Metric("metrics.usage", "usage", +1, 3),
    Metric("metrics.dead_codes", "dead codes", -1, 1),
    Metric("metrics.quant_error", "quant. error", 0, 4),  # scales differ between methods (LayerNorm, FSQ)
    Metric("metrics.rfid", "rFID", -1, 2),
    Metric("metrics.kid", "KID", -1, 4),
    Metric("metrics.lpips", "LPIPS", -1, 3),
    Metric("metrics.gfid", "gFID", -1, 2),
    Metric("metrics.prior_bits_per_code", "prior bits/code", 0, 3),
]
COST = [
    Metric("cost.train_s", "train time (s)", -1, 1),
    Metric("cost.wall_s", "wall time (s)", -1, 1),
    Metric("cost.train_images_per_s", "train img/s", +1, 1),
    Metric("cost.peak_mem_mb", "peak memory (MB)", -1, 0,
           caveat="peak memory: on a GPU the allocator's peak; on the CPU the process's resident high-water mark "
                  "from the run's start, which includes what earlier runs in the same process left allocated "
                  "(the inline launcher runs a whole grid in one process), so compare CPU figures only between "
                  "runs in separate processes (--launcher local or slurm, python -m bench.perf --memory)"),
    Metric("cost.params_total", "params (M)", 0, 3, 1e-6),
    Metric("cost.params_method", "method params (M)", 0, 3, 1e-6),
]


def values_of(runs: pd.DataFrame, metric: Metric) -> pd.Series:
    return numeric(runs, metric.column) * metric.scale


@dataclass
class Table:
    name: str  # file stem
    title: str
    header: list[str]
    rows: list[list[str]]
    bold: list[list[bool]]
    data: pd.DataFrame  # the numbers behind the table, written as CSV
    notes: list[str] = field(default_factory=list)
    text_columns: int = 1  # the first columns are names (left-aligned), the rest numbers (right-aligned)


def best_rows(means: list[float], metric: Metric) -> list[bool]:
    """Which rows hold the best mean as displayed (ties at the shown precision are all best). Nothing is best
    when the metric has no direction or fewer than two rows have a value."""
    shown = [None if pd.isna(m) else round(m, metric.digits) for m in means]
    present = [s for s in shown if s is not None]
    if metric.better == 0 or len(present) < 2:
        return [False] * len(means)
    best = max(present) if metric.better > 0 else min(present)
    return [s == best for s in shown]


# --- quality and cost ------------------------------------------------------------------------------------------

DIVERGED_NOTE = ("diverged: how many runs' training loss became non-finite, and at which step (the record's "
                 "divergence); they have no metrics and are left out of every mean")


def summary_table(runs: pd.DataFrame, metrics: list[Metric], name: str, title: str,
                  reasons: dict[str, list[str]] | None = None) -> Table | None:
    """Rows: methods; columns: metrics with at least one value; cells: mean ± std (ddof 1) over seeds. Where a
    run diverged, a column says how many of each method's did and at which step; a method none of whose runs
    has a value reads "diverged" in the cells of the metrics."""
    gone = diverged(runs)
    present = [m for m in metrics if values_of(runs, m)[~gone].notna().any()]
    if not present and not gone.any():
        return None
    labels = sorted(runs["method"].unique())
    experiment, dataset = runs["experiment"].iloc[0], runs["dataset"].iloc[0]
    cells = {label: {} for label in labels}
    data = []
    for metric in present:
        values = values_of(runs, metric).mask(gone)  # a diverged run's cost covers fewer steps: left out too
        summary = {label: values[runs["method"] == label].dropna() for label in labels}
        means = [s.mean() if len(s) else np.nan for s in summary.values()]
        for (label, seeds), best in zip(summary.items(), best_rows(means, metric)):
            mean, std = (seeds.mean(), seeds.std(ddof=1)) if len(seeds) else (np.nan, np.nan)
            text = mean_sd(seeds, metric.digits)
            if 0 < len(seeds) < (runs["method"] == label).sum():
                text += f" (n={len(seeds)})"
            elif not len(seeds) and gone[runs["method"] == label].any():
                text = "diverged"
            cells[label][metric.label] = (text, best)
            data.append({"experiment": experiment, "dataset": dataset, "method": label, "metric": metric.name,
                         "mean": mean, "std": std, "n": len(seeds), "best": best})
    rows, bold = [], []
    extra = ["diverged"] if gone.any() else []
    for label in labels:
        seeds = int((runs["method"] == label).sum())
        shown = [divergence_text(runs[runs["method"] == label]) or "0"] if extra else []
        rows.append([label, str(seeds), *shown] + [cells[label][m.label][0] for m in present])
        bold.append([False, False, *[False] * len(shown)] + [cells[label][m.label][1] for m in present])
    notes = [m.caveat for m in present if m.caveat] + ([DIVERGED_NOTE] if extra else [])
    absent = [m for m in metrics if m not in present]
    if absent:
        why = sorted({r for m in absent for r in (reasons or {}).get(m.column, [])})
        notes.append("no values: " + ", ".join(m.label for m in absent) + (f" ({'; '.join(why)})" if why else ""))
    return Table(name, title, ["method", "seeds", *extra] + [m.label for m in present], rows, bold,
                 pd.DataFrame(data), notes)


# --- codebook statistics per level (methods with several codes per position) ------------------------------------

LEVEL_COLUMN = re.compile(r"metrics\.(perplexity|usage|dead_codes)_level_(\d+)")
LEVEL_KINDS = {"perplexity": ("perplexity", +1, 1), "usage": ("usage", +1, 3), "dead_codes": ("dead codes", -1, 1)}
MULTI_LEVEL_NOTE = ("perplexity, usage and dead codes of a method with D codes per position (residual VQ) count "
                    "its K·D codebook vectors as one codebook (perplexity up to K·D, D times the geometric mean of "
                    "its levels'); each level's own: table levels")


def level_metrics(runs: pd.DataFrame) -> list[Metric]:
    """The per-level codebook metrics among the columns (metrics.perplexity_level_0, ...), level by level."""
    found = [(int(m.group(2)), list(LEVEL_KINDS).index(m.group(1)), m) for m in map(LEVEL_COLUMN.fullmatch, runs)
             if m]
    metrics = []
    for level, _, match in sorted(found, key=lambda item: item[:2]):
        label, better, digits = LEVEL_KINDS[match.group(1)]
        metrics.append(Metric(match.group(0), f"{label} L{level}", better, digits))
    return metrics


def levels_table(runs: pd.DataFrame) -> Table | None:
    """Rows: the methods with several codes per position; columns: perplexity, usage (fraction of the level's K)
    and dead codes of each level, level 0 (the coarsest) first; mean ± std over seeds. None when no run has any."""
    metrics = level_metrics(runs)
    if not metrics:
        return None
    has_levels = pd.concat([numeric(runs, m.column) for m in metrics], axis=1).notna().any(axis=1)
    table = summary_table(runs[has_levels].reset_index(drop=True), metrics, "levels",
                          "codebook statistics per level (test split), mean ± std over seeds")
    if table is not None:
        table.notes.append("level i: the codes chosen at depth i, counted over that level's own K codes; "
                           "L0 quantizes the encoder output, each further level the residual of those before it")
    return table


# --- differences to a reference --------------------------------------------------------------------------------

def default_reference(labels: list[str]) -> str:
    """The registry's reference method where it has runs here, else the first label."""
    reference = reference_method()
    return reference if reference in labels else sorted(labels)[0]


def differences_table(runs: pd.DataFrame, reference: str) -> Table | None:
    """Per quality metric and method: the paired-by-seed difference to the reference, with its 95% t-interval."""
    labels = sorted(runs["method"].unique())
    others = [label for label in labels if label != reference]
    if reference not in labels or not others:
        return None
    experiment, dataset = runs["experiment"].iloc[0], runs["dataset"].iloc[0]
    by_seed = lambda label, metric: values_of(runs, metric)[runs["method"] == label].set_axis(  # noqa: E731
        runs.loc[runs["method"] == label, "seed"])
    rows, bold, data = [], [], []
    for metric in [m for m in QUALITY if values_of(runs, m).notna().any()]:
        for label in others:
            d = paired_difference(by_seed(label, metric), by_seed(reference, metric))
            digits = metric.digits + 1
            if d.mean is None:
                verdict = "n/a"
            elif not d.excludes_zero:
                verdict = "no"
            elif metric.better == 0:
                verdict = "yes"
            else:
                verdict = "yes (better)" if (d.mean > 0) == (metric.better > 0) else "yes (worse)"
            interval = "n/a" if d.mean is None else f"[{fmt(d.low, digits, True)}, {fmt(d.high, digits, True)}]"
            rows.append([metric.label, label, fmt(d.mean, digits, True), interval, str(d.n), verdict])
            bold.append([False, False, bool(d.excludes_zero), bool(d.excludes_zero), False, False])
            data.append({"experiment": experiment, "dataset": dataset, "metric": metric.name, "method": label,
                         "reference": reference, "n": d.n, "mean_difference": d.mean, "ci_low": d.low,
                         "ci_high": d.high, "excludes_zero": d.excludes_zero})
    if not rows:
        return None
    notes = ["Δ: mean over seeds of (method − reference) on the same seed; 95% t-interval on the paired "
             "differences; seeds only one side has are dropped; n/a below 2 paired seeds."]
    gone = [f"{label}: {divergence_text(runs[runs['method'] == label], of=True)}" for label in labels
            if divergence_text(runs[runs["method"] == label])]
    if gone:
        notes.append("diverged seeds, left out of the pairs: " + "; ".join(gone))
    return Table("differences", f"differences to {reference} (paired by seed)",
                 ["metric", "method", f"Δ vs {reference}", "95% CI", "paired seeds", "CI excludes 0"],
                 rows, bold, pd.DataFrame(data), notes, text_columns=2)


# --- equal compute ---------------------------------------------------------------------------------------------

def value_at_time(curve: list[dict], time: float, key: str) -> float | None:
    """The curve's `key` at training time `time` (linear between validation points); None outside the curve."""
    points = sorted((p["train_s"], p[key]) for p in curve
                    if p.get("train_s") is not None and p.get(key) is not None)
    if not points or not points[0][0] - 1e-9 <= time <= points[-1][0] + 1e-9:
        return None
    times, values = zip(*points)
    return float(np.interp(time, times, values))


def equal_compute_table(runs: pd.DataFrame, records: dict[str, dict]) -> Table | str:
    """Each method's validation MSE at the same training time T, the largest time every run's curve reaches."""
    gone = diverged(runs)
    left_out = sorted(runs.loc[gone, "method"].unique())
    runs = runs[~gone]  # a diverged run's curve stops early: it would set T
    if runs.empty:
        return "every run diverged"
    curves = {path: [p for p in records[path].get("curves") or [] if p.get("train_s") is not None]
              for path in runs["path"]}
    usable = {path: curve for path, curve in curves.items() if curve}
    if not usable:
        return "no curve carries train_s"
    horizon = min(max(p["train_s"] for p in curve) for curve in usable.values())
    experiment, dataset = runs["experiment"].iloc[0], runs["dataset"].iloc[0]
    mse_metric = Metric("mse_at_T", "val MSE at T", -1, 5)
    per_label = {}
    for label in sorted(runs["method"].unique()):
        paths = runs.loc[runs["method"] == label, "path"]
        at = pd.Series([value_at_time(curves[p], horizon, "mse") for p in paths], dtype=float)
        step = pd.Series([value_at_time(curves[p], horizon, "step") for p in paths], dtype=float)
        final = pd.Series([max(curves[p], key=lambda q: q["train_s"])["mse"] if curves[p] else None
                           for p in paths], dtype=float)
        per_label[label] = (at.dropna(), step.dropna(), final.dropna())
    best = best_rows([a.mean() if len(a) else np.nan for a, _, _ in per_label.values()], mse_metric)
    rows, bold, data, late = [], [], [], []
    for (label, (at, step, final)), is_best in zip(per_label.items(), best):
        if at.empty:
            late.append(label)
        rows.append([label, str(len(at)), mean_sd(at, 5), mean_sd(step, 0), mean_sd(final, 5)])
        bold.append([False, False, is_best, False, False])
        data.append({"experiment": experiment, "dataset": dataset, "method": label, "time_s": horizon,
                     "n": len(at), "val_mse_mean": at.mean() if len(at) else np.nan,
                     "val_mse_std": at.std(ddof=1) if len(at) > 1 else np.nan,
                     "step_mean": step.mean() if len(step) else np.nan,
                     "final_val_mse_mean": final.mean() if len(final) else np.nan})
    notes = [f"T = {fmt(horizon, 2)} s of training time (validation excluded), the longest every run reaches; "
             "values interpolated linearly between validation points."]
    if late:
        notes.append(f"n/a: the first validation point of {', '.join(late)} comes after T; "
                     "a smaller --eval-every gives more points")
    if left_out:
        notes.append(f"diverged runs left out (of {', '.join(left_out)}): their curves stop where they diverged")
    return Table("equal_compute", "validation MSE at equal training time",
                 ["method", "seeds", "val MSE at T", "step at T", "final val MSE"], rows, bold,
                 pd.DataFrame(data), notes)
