"""`python -m bench.report DIR` : tables (mean +- std over seeds) and figures from the records under DIR."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from bench import UserError
from bench.records import load_records

# (column, label, higher is better)
HEADLINE = [
    ("metrics.mse", "MSE", False),
    ("metrics.psnr", "PSNR (dB)", True),
    ("metrics.ssim", "SSIM", True),
    ("metrics.perplexity", "perplexity", True),
    ("metrics.usage", "usage", True),
    ("metrics.rfid", "rFID", False),
    ("metrics.gfid", "gFID", False),
    ("cost.train_images_per_s", "train img/s", True),
]


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean, std and count over seeds of every headline column, per (experiment, dataset, method)."""
    columns = [c for c, _, _ in HEADLINE if c in frame and frame[c].notna().any()]
    numeric = frame[columns].apply(pd.to_numeric, errors="coerce")
    grouped = pd.concat([frame[["experiment", "spec.dataset", "spec.method"]], numeric], axis=1).groupby(
        ["experiment", "spec.dataset", "spec.method"], sort=True)
    return grouped.agg(["mean", "std", "count"])


def format_cell(mean: float, std: float, digits: int) -> str:
    if pd.isna(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if pd.isna(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def digits_for(column: str) -> int:
    return {"metrics.mse": 5, "metrics.ssim": 3, "metrics.usage": 3, "metrics.psnr": 2}.get(column, 1)


def records_table(frame: pd.DataFrame) -> str:
    """Markdown: one table per (experiment, dataset); rows are methods, cells mean ± std over seeds."""
    summary = summarize(frame)
    labels = {c: label for c, label, _ in HEADLINE}
    blocks = []
    for (experiment, dataset), block in summary.groupby(level=[0, 1]):
        rows = []
        for (_, _, method), row in block.iterrows():
            cells = {"method": method, "seeds": int(row.xs("count", level=1).max())}
            for column in dict.fromkeys(c for c, _ in row.index):
                cells[labels[column]] = format_cell(row[(column, "mean")], row[(column, "std")], digits_for(column))
            rows.append(cells)
        table = pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)
        blocks.append(f"### {experiment} / {dataset}\n\n{table}")
    return "\n\n".join(blocks)


def bar_chart(frame: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(frame)
    columns = list(dict.fromkeys(c for c, _ in summary.columns))
    labels = {c: label for c, label, _ in HEADLINE}
    groups = list(summary.groupby(level=[0, 1]))
    fig, axes = plt.subplots(len(groups), len(columns), figsize=(3.2 * len(columns), 2.8 * len(groups)),
                             squeeze=False)
    for r, ((experiment, dataset), block) in enumerate(groups):
        methods = [m for _, _, m in block.index]
        for c, column in enumerate(columns):
            ax = axes[r][c]
            ax.bar(methods, block[(column, "mean")], yerr=block[(column, "std")].fillna(0), capsize=3,
                   color=[f"C{i}" for i in range(len(methods))])
            ax.set_title(f"{labels[column]}\n{experiment}", fontsize=9)
            ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    p.add_argument("results", help="a results directory (the --out of bench.run)")
    p.add_argument("--figures", help="where figures go (default RESULTS/report)")
    args = p.parse_args(argv)
    try:
        frame = load_records(args.results)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(records_table(frame))
    figure = Path(args.figures or Path(args.results) / "report") / "summary.png"
    bar_chart(frame, figure)
    print(f"\nfigure: {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
