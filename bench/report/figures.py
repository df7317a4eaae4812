"""The report's figures, one function per figure, each for one (experiment, dataset) group of runs.

Every figure function takes the group's runs (a DataFrame from `bench.report.prepare`: one row per run with
experiment, dataset, method (the label), base_method, seed, path, metrics.*, cost.*) and the raw records by path,
and returns a matplotlib Figure, or a string saying why the figure was skipped. `save` writes PNG and PDF.

No pyplot: figures are plain `matplotlib.figure.Figure` objects, so nothing global (backend, open figures) is
touched. Rendering is made as reproducible as matplotlib allows: the "default" style plus fixed rcParams (a
user's matplotlibrc changes nothing), no PNG "Software" and no PDF "CreationDate"/"Producer" metadata.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import matplotlib
import matplotlib.style
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, LogLocator, MaxNLocator, NullFormatter

from bench.report.runs import numeric
from methods import palette_slots

# Every method has one colour in every figure and report: its palette slot comes from its registration
# (methods.palette_slots: claimed slots first, then free ones by name, never two methods on one slot).
# Related methods claim neighbouring slots of tab20, which pairs a dark and a light shade of one hue.
PALETTE = (*matplotlib.colormaps["tab20"].colors, *matplotlib.colormaps["tab20b"].colors,
           *matplotlib.colormaps["tab20c"].colors)

RC = {
    "font.family": "DejaVu Sans",  # bundled with matplotlib: the same glyphs on every machine
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.grid": True,
    "axes.axisbelow": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.frameon": False,
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "pdf.fonttype": 42,
    "svg.hashsalt": "vq-bench",
    "svg.fonttype": "none",
}
PNG_METADATA = {"Software": None}
PDF_METADATA = {"Creator": None, "Producer": None, "CreationDate": None}

# The headline metrics that get a bar chart: (column, file name, axis label with unit and direction).
BAR_METRICS = [
    ("metrics.mse", "mse", "test MSE, pixels in [0, 1]", "lower is better"),
    ("metrics.perplexity", "perplexity", "test perplexity (codes)", "higher is better"),
    ("metrics.usage", "usage", "test usage (fraction of K)", "higher is better"),
    ("metrics.rfid", "rfid", "rFID", "lower is better"),
    ("metrics.gfid", "gfid", "gFID", "lower is better"),
]
CURVE_PANELS = [
    ("mse", "validation MSE, pixels in [0, 1]", "log"),
    ("perplexity", "validation perplexity (codes)", "linear"),
    ("usage", "validation usage (fraction of K)", "linear"),
]


def method_colour(method: str) -> str:
    """The method's colour (hex), the same in every figure; `method` is the registered name (spec.method)."""
    return matplotlib.colors.to_hex(PALETTE[palette_slots([method])[method]])


@contextlib.contextmanager
def fixed_style():
    """matplotlib's default style plus RC, whatever the user's matplotlibrc says."""
    with matplotlib.style.context("default"), matplotlib.rc_context(RC):
        yield


def save(fig: Figure, stem: Path) -> list[Path]:
    """Write stem.png and stem.pdf without time stamps or version strings; returns the two paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    png, pdf = stem.parent / f"{stem.name}.png", stem.parent / f"{stem.name}.pdf"
    with fixed_style():
        fig.savefig(png, metadata=PNG_METADATA)
        fig.savefig(pdf, metadata=PDF_METADATA)
    return [png, pdf]


def _title(runs: pd.DataFrame) -> str:
    return f"{runs['experiment'].iloc[0]} / {runs['dataset'].iloc[0]}"


def _colours(runs: pd.DataFrame) -> dict[str, str]:
    """label -> colour of its base method."""
    firsts = runs.drop_duplicates("method").set_index("method")["base_method"]
    slots = palette_slots(firsts.unique())  # one call: methods no longer registered get distinct slots too
    return {label: matplotlib.colors.to_hex(PALETTE[slots[base]]) for label, base in firsts.items()}


def _labels(runs: pd.DataFrame) -> list[str]:
    return sorted(runs["method"].unique())


# --- bar charts ----------------------------------------------------------------------------------------------

def bar_figure(runs: pd.DataFrame, column: str, ylabel: str, direction: str = "") -> Figure | str:
    """Mean over seeds per method, error bar one standard deviation (ddof 1), one dot per seed."""
    values = numeric(runs, column)
    if values.isna().all():
        return "no values"
    labels, colours = _labels(runs), _colours(runs)
    with fixed_style():
        fig = Figure(figsize=(max(3.6, 0.65 * len(labels) + 1.6), 3.2), layout="constrained")
        ax = fig.add_subplot()
        for x, label in enumerate(labels):
            seeds = values[runs["method"] == label].dropna()
            if seeds.empty:
                continue
            std = seeds.std(ddof=1) if len(seeds) > 1 else 0.0
            ax.bar(x, seeds.mean(), yerr=std, capsize=3, color=colours[label], edgecolor="black", linewidth=0.5)
            ax.scatter(np.full(len(seeds), x + 0.22), seeds, s=8, color="black", zorder=3)  # beside the error bar
        ax.set_xticks(range(len(labels)), labels, rotation=30 if len(labels) > 4 else 0,
                      ha="right" if len(labels) > 4 else "center")
        ax.set_xlabel("method")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{_title(runs)}" + (f" ({direction})" if direction else "")
                     + "\nbars: mean ± std over seeds; dots: seeds")
    return fig


# --- training curves ---------------------------------------------------------------------------------------

def curve_frame(runs: pd.DataFrame, records: dict[str, dict]) -> pd.DataFrame:
    """One row per (run, validation point): method, seed, step, train_s, mse, perplexity, usage."""
    rows = []
    for run in runs.itertuples(index=False):
        for point in records[run.path].get("curves") or []:
            rows.append({"method": run.method, "seed": run.seed, **point})
    columns = ["method", "seed", "step", "train_s", "mse", "perplexity", "usage"]
    frame = pd.DataFrame(rows, columns=list(dict.fromkeys(columns + [c for r in rows for c in r])))
    for column in frame.columns.drop(["method"]):
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame.sort_values(["method", "seed", "step"], kind="stable").reset_index(drop=True)


def curves_figure(runs: pd.DataFrame, records: dict[str, dict]) -> Figure | str:
    """Validation MSE, perplexity and usage against step: mean over seeds, band one std (ddof 1)."""
    curves = curve_frame(runs, records)
    if curves.empty:
        return "no run has validation curves"
    colours = _colours(runs)
    with fixed_style():
        fig = Figure(figsize=(11.5, 3.2), layout="constrained")
        axes = fig.subplots(1, len(CURVE_PANELS), sharex=True)
        for ax, (key, ylabel, scale) in zip(axes, CURVE_PANELS):
            for label in _labels(runs):
                stats = curves[curves["method"] == label].groupby("step")[key].agg(["mean", "std", "count"])
                if stats.empty:
                    continue
                steps = stats.index.to_numpy(float)
                ax.plot(steps, stats["mean"], color=colours[label], label=label, marker="o", markersize=2.5)
                if (stats["count"] > 1).any():
                    std = stats["std"].fillna(0.0)
                    ax.fill_between(steps, stats["mean"] - std, stats["mean"] + std, color=colours[label],
                                    alpha=0.2, linewidth=0)
            ax.set_yscale(scale)
            if scale == "log":  # plain decimals at 1-2-5 steps, not 3.4x10^-2 nor a label on every minor tick
                ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
                ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("training step")
            ax.set_ylabel(ylabel)
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper")  # 13 lines hide any panel
        fig.suptitle(f"{_title(runs)}: validation curves (mean over seeds, band ± std)")
    return fig


# --- code frequencies --------------------------------------------------------------------------------------

def sorted_frequencies(histogram) -> np.ndarray:
    """A code histogram as frequencies summing to 1, most used code first."""
    counts = np.asarray(histogram, dtype=float)
    total = counts.sum()
    return np.sort(counts)[::-1] / total if total > 0 else np.zeros_like(counts)


def level_histograms(histogram) -> list[np.ndarray]:
    """A record's env.code_histogram as one (K,) histogram per level: [the histogram] for a flat (K,) list, one
    per row for a (D, K) nested list (a method with D codes per position)."""
    counts = np.asarray(histogram, dtype=float)
    return list(counts) if counts.ndim == 2 else [counts]


LEVEL_STYLES = ("-", "--", ":", "-.")


def code_frequency_figure(runs: pd.DataFrame, records: dict[str, dict]) -> Figure | str:
    """Normalized code frequency against rank (log y), mean over seeds of the sorted curves; the uniform 1/K.
    A method with D codes per position gets one line per level (each level's K codes, its own frequencies), in
    its colour with one dash pattern per level."""
    colours = _colours(runs)
    curves: dict[tuple[str, int, int], np.ndarray] = {}  # (label, level, depth) -> mean sorted frequencies
    for label in _labels(runs):
        per_run = [level_histograms(records[p]["env"]["code_histogram"])
                   for p in runs.loc[runs["method"] == label, "path"]
                   if records[p].get("env", {}).get("code_histogram")]
        depth = max((len(levels) for levels in per_run), default=0)
        for level in range(depth):
            sorted_runs = [sorted_frequencies(levels[level]) for levels in per_run if level < len(levels)]
            size = max(len(f) for f in sorted_runs)
            curves[label, level, depth] = np.mean([np.pad(f, (0, size - len(f))) for f in sorted_runs], axis=0)
    if not curves:
        return "no record has env.code_histogram"
    with fixed_style():
        fig = Figure(figsize=(5.0, 3.4), layout="constrained")
        ax = fig.add_subplot()
        for (label, level, depth), frequency in curves.items():
            used = frequency > 0  # a log axis cannot show unused codes: the line ends at the last used one
            ranks = np.arange(1, len(frequency) + 1)
            ax.plot(ranks[used], frequency[used], color=colours[label],
                    label=label if depth == 1 else f"{label}, level {level}",
                    linestyle=LEVEL_STYLES[level % len(LEVEL_STYLES)],
                    marker="o" if used.sum() <= 32 else None, markersize=3)  # a few used codes: show points
        sizes = {len(f) for f in curves.values()}
        if len(sizes) == 1:
            ax.axhline(1.0 / min(sizes), color="grey", linestyle="--", linewidth=0.8, label="uniform (1/K)")
        ax.set_xlim(0, max(sizes) + 1)  # the whole codebook: where a line ends, the dead codes begin
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("code rank (most used first)")
        ax.set_ylabel("frequency (fraction of test latents)")
        ax.set_title(f"{_title(runs)}: sorted code frequencies (mean over seeds)")
        ax.legend(loc="best")
    return fig


# --- reconstructions ---------------------------------------------------------------------------------------

def samples_path(record_path: str | Path) -> Path:
    """Where bench.train writes a record's first test images and reconstructions."""
    return Path(record_path).with_suffix(".samples.npz")


def image_row(images: np.ndarray, gap: int = 2) -> np.ndarray:
    """(N, 3, H, W) uint8 -> one (H, N*W + gaps, 3) strip with white gaps."""
    n, _, h, w = images.shape
    strip = np.full((h, n * w + (n - 1) * gap, 3), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        strip[:, i * (w + gap): i * (w + gap) + w] = image.transpose(1, 2, 0)
    return strip


def first_seed_run(runs: pd.DataFrame, label: str) -> pd.Series:
    """The run of seed 0, else of the smallest seed."""
    mine = runs[runs["method"] == label]
    return mine.loc[mine["seed"].idxmin()] if 0 not in set(mine["seed"]) else mine[mine["seed"] == 0].iloc[0]


def reconstruction_figure(runs: pd.DataFrame, records: dict[str, dict]) -> Figure | str:
    """Originals in the first row, then one row per method: the same test images, from seed 0's samples."""
    rows: list[tuple[str, np.ndarray]] = []
    original = None
    for label in _labels(runs):
        path = samples_path(first_seed_run(runs, label)["path"])
        if not path.exists():
            continue
        with np.load(path) as samples:
            if original is None:
                original = samples["original"]
            rows.append((label, samples["reconstruction"]))
    if original is None:
        return "no .samples.npz beside the records"
    count = min([len(original)] + [len(r) for _, r in rows])
    with fixed_style():
        height, width = original.shape[2:]
        strip_aspect = (count * width + (count - 1) * 2) / height
        fig_width = min(12.0, 0.9 * count + 1.4)  # 1.4 in for the row labels
        row_height = (fig_width - 1.4) / strip_aspect + 0.08
        fig = Figure(figsize=(fig_width, (len(rows) + 1) * row_height + 0.4), layout="constrained")
        axes = fig.subplots(len(rows) + 1, 1, squeeze=False)[:, 0]
        for ax, (label, images) in zip(axes, [("original", original)] + rows):
            ax.imshow(image_row(images[:count]), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            for spine in ax.spines.values():
                spine.set_visible(False)
            ax.set_ylabel(label, rotation=0, ha="right", va="center")
        fig.suptitle(f"{_title(runs)}: test reconstructions (seed 0 or the first seed)")
    return fig


# --- quality against cost ----------------------------------------------------------------------------------

def quality_cost_columns(runs: pd.DataFrame) -> tuple[tuple[str, str], tuple[str, str]]:
    """((y column, y label), (x column, x label)): rFID if any run has it else MSE, against train_s or wall_s."""
    y = (("metrics.rfid", "rFID (lower is better)") if numeric(runs, "metrics.rfid").notna().any()
         else ("metrics.mse", "test MSE, pixels in [0, 1] (lower is better)"))
    x = (("cost.train_s", "training time (s, validation excluded)") if numeric(runs, "cost.train_s").notna().any()
         else ("cost.wall_s", "wall time (s)"))
    return y, x


def quality_cost_figure(runs: pd.DataFrame) -> Figure | str:
    """One point per run, coloured by method."""
    (y, ylabel), (x, xlabel) = quality_cost_columns(runs)
    xs, ys = numeric(runs, x), numeric(runs, y)
    if (xs.notna() & ys.notna()).sum() == 0:
        return f"no run has both {x} and {y}"
    colours = _colours(runs)
    with fixed_style():
        fig = Figure(figsize=(6.0, 3.4), layout="constrained")
        ax = fig.add_subplot()
        for label in _labels(runs):
            mine = (runs["method"] == label) & xs.notna() & ys.notna()
            if mine.any():
                ax.scatter(xs[mine], ys[mine], color=colours[label], label=label, s=22, edgecolor="black",
                           linewidth=0.4)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{_title(runs)}: quality against cost (one point per run)")
        fig.legend(loc="outside right upper")
    return fig


FIGURE_STEMS = [f"bar_{name}" for _, name, _, _ in BAR_METRICS] + [
    "curves", "code_frequency", "reconstructions", "quality_vs_cost"]


# --- all figures of one group --------------------------------------------------------------------------------

def group_figures(runs: pd.DataFrame, records: dict[str, dict], folder: Path,
                  null_reasons: dict[str, list[str]] | None = None) -> tuple[list[Path], list[str]]:
    """Every figure of one (experiment, dataset) group into folder -> (files written, notes on skipped ones).
    null_reasons: metric column -> the records' reasons for its nulls, quoted when a bar chart is skipped."""
    written, notes = [], []
    plans = [(f"bar_{name}", lambda c=column, yl=ylabel, d=direction: bar_figure(runs, c, yl, d), column)
             for column, name, ylabel, direction in BAR_METRICS]
    plans += [
        ("curves", lambda: curves_figure(runs, records), None),
        ("code_frequency", lambda: code_frequency_figure(runs, records), None),
        ("reconstructions", lambda: reconstruction_figure(runs, records), None),
        ("quality_vs_cost", lambda: quality_cost_figure(runs), None),
    ]
    for name, make, column in plans:
        fig = make()
        if isinstance(fig, str):
            reasons = "; ".join((null_reasons or {}).get(column, [])) if column else ""
            notes.append(f"skipped {name} ({_title(runs)}): {fig}" + (f" (null: {reasons})" if reasons else ""))
            continue
        written += save(fig, folder / name)
    return written, notes
