"""bench.report: the tables and figures of a paper, regenerated from run records (`python -m bench.report DIR`;
what it writes is in cli.py). One job per module, in the order the data flows:

    runs.py     records -> the runs DataFrame: one row per run, method labels, (experiment, dataset) groups
    stats.py    how numbers are written (fixed decimals, mean ± std) and paired differences with t-intervals
    tables.py   the metrics shown and the tables: quality, cost, differences to a reference, equal compute
    formats.py  a table as markdown, LaTeX and CSV
    figures.py  the figures (matplotlib, imported only when a report draws them)
    build.py    one report: every group's tables and figures into its folder, and report.md
    cli.py      the command line (run by __main__.py)
"""
from bench.report.build import TABLE_STEMS, build_report, group_tables, records_table, remove_stale, slug
from bench.report.cli import main
from bench.report.formats import latex_text, to_csv, to_latex, to_markdown, write_table
from bench.report.runs import canonical, groups, load, method_labels, null_reasons, numeric, prepare
from bench.report.stats import PairedDifference, fmt, mean_sd, paired_difference
from bench.report.tables import (COST, QUALITY, Metric, Table, best_rows, default_reference, differences_table,
                                 equal_compute_table, summary_table, value_at_time, values_of)

__all__ = [
    "TABLE_STEMS", "build_report", "group_tables", "records_table", "remove_stale", "slug", "main",
    "latex_text", "to_csv", "to_latex", "to_markdown", "write_table",
    "canonical", "groups", "load", "method_labels", "null_reasons", "numeric", "prepare",
    "PairedDifference", "fmt", "mean_sd", "paired_difference",
    "COST", "QUALITY", "Metric", "Table", "best_rows", "default_reference", "differences_table",
    "equal_compute_table", "summary_table", "value_at_time", "values_of",
]
