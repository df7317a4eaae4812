"""`python -m bench.report DIR [--out FIGDIR] [--reference ste]` : the tables and figures of a paper, from the
records under DIR. `python -m bench.report --paper` regenerates results/report/ from the committed records.

Everything is grouped by (experiment, dataset): records of different experiments never mix. Per group, under
OUT/<experiment>/<dataset>/ (OUT defaults to DIR/report):
- tables as markdown (printed, .md), LaTeX (.tex, needs booktabs) and CSV (.csv):
  quality and cost (mean ± std over seeds, the best in bold), differences to a reference method (mean paired
  difference over seeds with a 95% t-interval), and validation MSE at equal training time;
- figures as PNG and PDF (bench/figures.py): a bar chart per headline metric, training curves, sorted
  code frequencies, a reconstruction grid, quality against cost.
OUT/report.md holds every group's tables. The same records always give byte-identical tables.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from bench import UserError
from bench.records import load_records, read_records
from bench.spec import RunSpec
from methods import reference_method

ROOT = Path(__file__).resolve().parent.parent
# The committed set lives in its own experiment folder, so records a user adds under results/ (the main job
# writes results/photos-vqvae/) never leak into the paper's tables.
PAPER_RESULTS = ROOT / "results" / "photos-300"
PAPER_REPORT = ROOT / "results" / "report"
CSV_FLOAT = "%.6g"


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
# Fields that do not tell two configurations of a method apart (the group keys, the seed, how it ran).
NOT_IDENTITY = {"spec.seed", "spec.method", "spec.dataset", "spec.experiment"} | {
    f"spec.{name}" for name in RunSpec.RUNTIME_FIELDS}


# --- loading ---------------------------------------------------------------------------------------------------

def load(directory: str | Path) -> tuple[pd.DataFrame, dict[str, dict]]:
    """(one row per run, the raw records by path). Nested spec values (method_options, model_options) become
    spec.method_options.NAME columns. Raises UserError when there is no record."""
    frame = load_records(directory)
    records = {r["_path"]: r for r in read_records(directory)}
    nested = pd.DataFrame([
        {f"spec.{key}.{name}": value for key, options in records[path]["spec"].items() if isinstance(options, dict)
         for name, value in options.items()}
        for path in frame["path"]], index=frame.index)
    return pd.concat([frame, nested], axis=1), records


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


def values_of(runs: pd.DataFrame, metric: Metric) -> pd.Series:
    if metric.column not in runs:
        return pd.Series(np.nan, index=runs.index)
    return pd.to_numeric(runs[metric.column], errors="coerce") * metric.scale


def null_reasons(runs: pd.DataFrame, records: dict[str, dict]) -> dict[str, list[str]]:
    """metric column -> the distinct reasons the group's records give for its nulls."""
    reasons: dict[str, set[str]] = {}
    for path in runs["path"]:
        for name, reason in (records.get(path, {}).get("null_reasons") or {}).items():
            reasons.setdefault(f"metrics.{name}", set()).add(str(reason))
    return {column: sorted(texts) for column, texts in reasons.items()}


# --- tables ----------------------------------------------------------------------------------------------------

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


def fmt(value: float, digits: int, sign: bool = False) -> str:
    """Fixed decimals; never "-0.00"."""
    if value is None or pd.isna(value):
        return "n/a"
    text = f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"
    if float(text) == 0:
        text = f"{0.0:+.{digits}f}" if sign else f"{0.0:.{digits}f}"
    return text


def best_rows(means: list[float], metric: Metric) -> list[bool]:
    """Which rows hold the best mean as displayed (ties at the shown precision are all best). Nothing is best
    when the metric has no direction or fewer than two rows have a value."""
    shown = [None if pd.isna(m) else round(m, metric.digits) for m in means]
    present = [s for s in shown if s is not None]
    if metric.better == 0 or len(present) < 2:
        return [False] * len(means)
    best = max(present) if metric.better > 0 else min(present)
    return [s == best for s in shown]


def summary_table(runs: pd.DataFrame, metrics: list[Metric], name: str, title: str,
                  reasons: dict[str, list[str]] | None = None) -> Table | None:
    """Rows: methods; columns: metrics with at least one value; cells: mean ± std (ddof 1) over seeds."""
    present = [m for m in metrics if values_of(runs, m).notna().any()]
    if not present:
        return None
    labels = sorted(runs["method"].unique())
    experiment, dataset = runs["experiment"].iloc[0], runs["dataset"].iloc[0]
    cells = {label: {} for label in labels}
    data = []
    for metric in present:
        values = values_of(runs, metric)
        summary = {label: values[runs["method"] == label].dropna() for label in labels}
        means = [s.mean() if len(s) else np.nan for s in summary.values()]
        for (label, seeds), best in zip(summary.items(), best_rows(means, metric)):
            mean, std = (seeds.mean(), seeds.std(ddof=1)) if len(seeds) else (np.nan, np.nan)
            text = fmt(mean, metric.digits) + ("" if pd.isna(std) else f" ± {fmt(std, metric.digits)}")
            if 0 < len(seeds) < (runs["method"] == label).sum():
                text += f" (n={len(seeds)})"
            cells[label][metric.label] = (text, best)
            data.append({"experiment": experiment, "dataset": dataset, "method": label, "metric": metric.name,
                         "mean": mean, "std": std, "n": len(seeds), "best": best})
    rows, bold = [], []
    for label in labels:
        seeds = int((runs["method"] == label).sum())
        rows.append([label, str(seeds)] + [cells[label][m.label][0] for m in present])
        bold.append([False, False] + [cells[label][m.label][1] for m in present])
    notes = [m.caveat for m in present if m.caveat]
    absent = [m for m in metrics if m not in present]
    if absent:
        why = sorted({r for m in absent for r in (reasons or {}).get(m.column, [])})
        notes.append("no values: " + ", ".join(m.label for m in absent) + (f" ({'; '.join(why)})" if why else ""))
    return Table(name, title, ["method", "seeds"] + [m.label for m in present], rows, bold,
                 pd.DataFrame(data), notes)


@dataclass(frozen=True)
class PairedDifference:
    """mean over seeds of (method - reference), and its confidence interval; None where n < 2."""
    n: int
    mean: float | None
    low: float | None
    high: float | None

    @property
    def excludes_zero(self) -> bool | None:
        return None if self.mean is None else bool(self.low > 0 or self.high < 0)


def paired_difference(values: pd.Series, reference: pd.Series, confidence: float = 0.95) -> PairedDifference:
    """values and reference indexed by seed. Seeds only one side has, or null on one side, are dropped; the
    interval is mean ± t_{(1+confidence)/2, n-1} * std(ddof 1) / sqrt(n) of the paired differences."""
    both = pd.concat([values.rename("value"), reference.rename("reference")], axis=1).dropna().sort_index()
    differences = (both["value"] - both["reference"]).to_numpy(dtype=float)
    n = len(differences)
    if n < 2:
        return PairedDifference(n, None, None, None)
    mean = float(differences.mean())
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * differences.std(ddof=1) / math.sqrt(n))
    return PairedDifference(n, mean, mean - half, mean + half)


def default_reference(labels: list[str]) -> str:
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
    return Table("differences", f"differences to {reference} (paired by seed)",
                 ["metric", "method", f"Δ vs {reference}", "95% CI", "paired seeds", "CI excludes 0"],
                 rows, bold, pd.DataFrame(data), notes, text_columns=2)


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
        mean_sd = lambda s, d: "n/a" if s.empty else fmt(s.mean(), d) + (  # noqa: E731
            f" ± {fmt(s.std(ddof=1), d)}" if len(s) > 1 else "")
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
    return Table("equal_compute", "validation MSE at equal training time",
                 ["method", "seeds", "val MSE at T", "step at T", "final val MSE"], rows, bold,
                 pd.DataFrame(data), notes)


# --- rendering -------------------------------------------------------------------------------------------------

def to_markdown(table: Table) -> str:
    cells = [[f"**{text}**" if b else text for text, b in zip(row, bolds)]
             for row, bolds in zip(table.rows, table.bold)]
    align = ["left"] * table.text_columns + ["right"] * (len(table.header) - table.text_columns)
    body = pd.DataFrame(cells, columns=table.header).to_markdown(index=False, disable_numparse=True,
                                                                 colalign=align)
    return "\n\n".join([f"#### {table.title}", body] + [f"_{note}_" for note in table.notes])


LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                 "±": r"$\pm$", "Δ": r"$\Delta$", "−": "-"}


def latex_text(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(ch, ch) for ch in text)


def to_latex(table: Table) -> str:
    cell = lambda text, b: rf"\textbf{{{latex_text(text)}}}" if b else latex_text(text)  # noqa: E731
    lines = [f"% {latex_text(table.title)}", "% generated by `python -m bench.report`; needs \\usepackage{booktabs}",
             r"\begin{tabular}{" + "l" * table.text_columns + "r" * (len(table.header) - table.text_columns) + "}",
             r"\toprule",
             " & ".join(latex_text(h) for h in table.header) + r" \\", r"\midrule"]
    lines += [" & ".join(cell(t, b) for t, b in zip(row, bolds)) + r" \\" for row, bolds in zip(table.rows, table.bold)]
    lines += [r"\bottomrule", r"\end{tabular}"] + [f"% {latex_text(note)}" for note in table.notes]
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    return table.data.to_csv(index=False, float_format=CSV_FLOAT, lineterminator="\n")


def write_table(table: Table, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix, text in ((".md", to_markdown(table) + "\n"), (".tex", to_latex(table)), (".csv", to_csv(table))):
        path = folder / f"{table.name}{suffix}"
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        written.append(path)
    return written


# --- the report ------------------------------------------------------------------------------------------------

def group_tables(runs: pd.DataFrame, records: dict[str, dict], reference: str | None,
                 notes: list[str]) -> list[Table]:
    """Every table of one (experiment, dataset) group; what is skipped is said in notes."""
    where = f"{runs['experiment'].iloc[0]} / {runs['dataset'].iloc[0]}"
    labels = sorted(runs["method"].unique())
    reasons = null_reasons(runs, records)
    tables = [summary_table(runs, QUALITY, "quality", "quality (test split), mean ± std over seeds", reasons),
              summary_table(runs, COST, "cost", "cost, mean ± std over seeds")]
    chosen = reference or default_reference(labels)
    if chosen not in labels:
        notes.append(f"skipped differences ({where}): reference {chosen!r} has no runs here; "
                     f"methods: {', '.join(labels)}")
    elif len(labels) < 2:
        notes.append(f"skipped differences ({where}): only one method")
    else:
        tables.append(differences_table(runs, chosen))
    equal = equal_compute_table(runs, records)
    if isinstance(equal, str):
        notes.append(f"skipped equal_compute ({where}): {equal}")
    else:
        tables.append(equal)
    return [t for t in tables if t is not None]


def slug(name: str) -> str:
    """A folder name for an experiment or dataset name."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("._") or "_"


TABLE_STEMS = ("quality", "cost", "differences", "equal_compute")


def remove_stale(folder: Path, written: list[Path], figures: bool) -> None:
    """Delete what an earlier report wrote into this group's folder and this one did not (a bar chart of a
    metric that is now null), so that the folder holds exactly this report. Only the report's own file names."""
    from bench.figures import FIGURE_STEMS

    stems = TABLE_STEMS + (tuple(FIGURE_STEMS) if figures else ())
    suffixes = (".md", ".tex", ".csv", ".png", ".pdf")
    keep = set(written)
    for path in folder.iterdir() if folder.is_dir() else []:
        if path.is_file() and path.stem in stems and path.suffix in suffixes and path not in keep:
            path.unlink()


def build_report(results: Path, out: Path, reference: str | None = None,
                 figures: bool = True) -> tuple[str, list[Path], list[str]]:
    """Write every table and figure of the records under results into out -> (markdown, files, notes)."""
    frame, records = load(results)
    runs, notes = prepare(frame)
    if reference is not None and reference not in set(runs["method"]):
        raise UserError(f"--reference {reference}: no runs of that method; methods: "
                        f"{', '.join(sorted(runs['method'].unique()))}")
    sections, written = [], []
    for (experiment, dataset), group in groups(runs):
        folder = out / slug(experiment) / slug(dataset)
        tables = group_tables(group, records, reference, notes)
        for table in tables:
            written += write_table(table, folder)
        sections.append(f"## {experiment} / {dataset}\n\n" + "\n\n".join(to_markdown(t) for t in tables))
        if figures:
            from bench.figures import group_figures

            paths, figure_notes = group_figures(group, records, folder, null_reasons(group, records))
            written += paths
            notes += figure_notes
        remove_stale(folder, written, figures)
    markdown = "\n\n".join(sections) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(markdown, encoding="utf-8")
    return markdown, [out / "report.md"] + written, notes


def records_table(frame: pd.DataFrame) -> str:
    """Markdown: per (experiment, dataset), quality and cost tables; rows are methods, cells mean ± std over
    seeds, the best in bold. `frame` is what bench.records.load_records returns (or rows of it)."""
    runs, _ = prepare(frame)
    blocks = []
    for (experiment, dataset), group in groups(runs):
        tables = [summary_table(group, QUALITY, "quality", "quality (test split)"),
                  summary_table(group, COST, "cost", "cost")]
        blocks.append(f"### {experiment} / {dataset}\n\n" + "\n\n".join(to_markdown(t) for t in tables if t))
    return "\n\n".join(blocks)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="?", help="a results directory (the --out of bench.run)")
    p.add_argument("--out", "--figures", dest="out", help="where tables and figures go (default RESULTS/report)")
    p.add_argument("--reference", help="the method others are compared with (default ste, else the first)")
    p.add_argument("--paper", action="store_true",
                   help="regenerate the suite's report from the committed records in results/photos-300 "
                        "into results/report")
    p.add_argument("--no-figures", action="store_true", help="tables only")
    args = p.parse_args(argv)
    if args.results is None and not args.paper:
        p.error("give a results directory (e.g. results/) or --paper")
    results = Path(args.results) if args.results else PAPER_RESULTS
    out = Path(args.out) if args.out else (results / "report" if args.results else PAPER_REPORT)
    try:
        markdown, written, notes = build_report(results, out, args.reference, figures=not args.no_figures)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(markdown)
    for note in notes:
        print(f"note: {note}")
    tables = sum(p.suffix in (".md", ".tex", ".csv") for p in written)
    print(f"wrote {tables} table files and {len(written) - tables} figure files under {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
