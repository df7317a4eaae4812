"""One report: the records under a results directory -> every (experiment, dataset) group's tables and figures
in OUT/<experiment>/<dataset>/, and all tables in OUT/report.md. Records of different experiments never mix."""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from bench import UserError
from bench.report.formats import to_markdown, write_table
from bench.report.runs import groups, load, null_reasons, prepare
from bench.report.tables import (COST, MULTI_LEVEL_NOTE, QUALITY, Table, default_reference, differences_table,
                                 equal_compute_table, levels_table, summary_table)

TABLE_STEMS = ("quality", "cost", "levels", "differences", "equal_compute")


def group_tables(runs: pd.DataFrame, records: dict[str, dict], reference: str | None,
                 notes: list[str]) -> list[Table]:
    """Every table of one (experiment, dataset) group; what is skipped is said in notes."""
    where = f"{runs['experiment'].iloc[0]} / {runs['dataset'].iloc[0]}"
    labels = sorted(runs["method"].unique())
    reasons = null_reasons(runs, records)
    tables = [summary_table(runs, QUALITY, "quality", "quality (test split), mean ± std over seeds", reasons),
              summary_table(runs, COST, "cost", "cost, mean ± std over seeds")]
    levels = levels_table(runs)  # only where a method has several codes per position
    if levels is not None:
        if tables[0] is not None:
            tables[0].notes.append(MULTI_LEVEL_NOTE)
        tables.append(levels)
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


def remove_stale(folder: Path, written: list[Path], figures: bool) -> None:
    """Delete what an earlier report wrote into this group's folder and this one did not (a bar chart of a
    metric that is now null), so that the folder holds exactly this report. Only the report's own file names."""
    from bench.report.figures import FIGURE_STEMS  # here, not on top: records_table needs no matplotlib

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
            from bench.report.figures import group_figures

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
