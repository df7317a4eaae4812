"""`python -m bench.report DIR [--out FIGDIR] [--reference ste]` : the tables and figures of a paper, from the
records under DIR. `python -m bench.report --paper` regenerates results/report/ from the committed records, and
each committed study's report (results/studies/<name>/report/, bench/study.py).

Everything is grouped by (experiment, dataset): records of different experiments never mix. Per group, under
OUT/<experiment>/<dataset>/ (OUT defaults to DIR/report):
- tables as markdown (printed, .md), LaTeX (.tex, needs booktabs) and CSV (.csv):
  quality and cost (mean ± std over seeds, the best in bold), differences to a reference method (mean paired
  difference over seeds with a 95% t-interval), and validation MSE at equal training time;
- figures as PNG and PDF (bench/report/figures.py): a bar chart per headline metric, training curves, sorted
  code frequencies, a reconstruction grid, quality against cost.
OUT/report.md holds every group's tables. The same records always give byte-identical tables.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench import UserError
from bench.report.build import build_report
from methods import reference_method

ROOT = Path(__file__).resolve().parents[2]
# The committed set lives in its own experiment folder, so records a user adds under results/ (the main job
# writes results/photos-vqvae/) never leak into the paper's tables.
PAPER_RESULTS = ROOT / "results" / "photos-300"
PAPER_REPORT = ROOT / "results" / "report"
STUDIES, STUDY_RESULTS = ROOT / "studies", ROOT / "results" / "studies"  # each committed study: its own report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="?", help="a results directory (the --out of bench.run)")
    p.add_argument("--out", "--figures", dest="out", help="where tables and figures go (default RESULTS/report)")
    p.add_argument("--reference", help=f"the method others are compared with (default {reference_method()}, "
                                       "else the first)")
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
    if args.paper:
        paper_studies()
    return 0


def paper_studies() -> None:
    """The committed studies' reports, results/studies/<name>/report/, from their records."""
    from bench.study import load_study, write_study_report

    for path in sorted(STUDIES.glob("*.toml")):
        if (STUDY_RESULTS / path.stem).is_dir():
            write_study_report(load_study(path), STUDY_RESULTS)
