"""bench.report on synthetic records: tables, paired intervals, equal compute, figures, grouping, determinism."""
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.records import write_record
from bench.report import figures
from bench.report import (build_report, differences_table, load, main, null_reasons, paired_difference, prepare,
                          records_table, summary_table, to_markdown, COST, QUALITY)
from bench.spec import RunSpec

ROOT = Path(__file__).resolve().parent.parent
METRIC_NAMES = ("mse", "psnr", "ssim", "perplexity", "usage", "dead_codes", "quant_error",
                "rfid", "kid", "lpips", "gfid", "prior_bits_per_code")
T_975 = {2: 4.303, 3: 3.182}  # Student's t, two-sided 95%, by degrees of freedom (printed tables)
PNG_MAGIC, PDF_MAGIC = b"\x89PNG\r\n\x1a\n", b"%PDF-"


def write_run(folder: Path, method: str, seed: int, experiment: str = "exp", dataset: str = "photos",
              metrics: dict | None = None, curves: list | None = None, histogram: list | None = None,
              pixel: int | None = None, train_s: float = 10.0, **options) -> Path:
    """One complete record (every key filled) and its .samples.npz; returns the record's path."""
    spec = RunSpec(method=method, seed=seed, experiment=experiment, dataset=dataset, steps=20,
                   codebook_size=8, method_options=options)
    values = {name: None for name in METRIC_NAMES}
    values.update({"mse": 0.05, "psnr": 13.0, "ssim": 0.4, "perplexity": 4.0, "usage": 0.5, "dead_codes": 4,
                   "quant_error": 0.01})
    values.update(metrics or {})
    run_id = spec.run_id()
    record = {
        "experiment": experiment,
        "run_id": run_id,
        "spec": spec.to_dict(),
        "metrics": values,
        "cost": {"wall_s": train_s + 2.0, "train_s": train_s, "train_images_per_s": 2560 / train_s, "eval_s": 1.0,
                 "resumes": 0, "peak_mem_mb": 300.0, "params_autoencoder": 1000, "params_method": 0,
                 "params_total": 1000},
        "null_reasons": {k: "not measured in this test" for k, v in values.items() if v is None},
        "curves": curves if curves is not None else [
            {"step": 10, "train_s": train_s / 2, "mse": 0.1 + seed / 100, "perplexity": 2.0, "usage": 0.25},
            {"step": 20, "train_s": train_s, "mse": 0.05 + seed / 100, "perplexity": 4.0, "usage": 0.5}],
        "env": {"packages": {"torch": "0"}, "python": "3.11", "git_commit": None, "device": "cpu",
                "device_name": "test", "cpu_count": 1, "torch_threads": 1, "hostname": "test", "codebook_size": 8,
                "export": {}, "test_images": 4,
                "code_histogram": histogram if histogram is not None else [5, 3, 2, 0, 0, 0, 0, 0]},
    }
    path = folder / experiment / f"{run_id}.json"
    write_record(path, record)
    rng = np.random.default_rng(seed)
    original = rng.integers(0, 256, size=(4, 3, 8, 8), dtype=np.uint8)
    reconstruction = np.full_like(original, pixel if pixel is not None else 10 * seed)
    np.savez_compressed(path.with_suffix(".samples.npz"), original=original, reconstruction=reconstruction)
    return path


def runs_of(folder: Path) -> tuple[pd.DataFrame, dict]:
    frame, records = load(folder)
    return prepare(frame)[0], records


@pytest.fixture
def grid(tmp_path):
    """Three methods x three seeds; MSE lowest for `b`, perplexity highest for `c`."""
    mse = {"a": [0.30, 0.32, 0.31], "b": [0.10, 0.14, 0.12], "c": [0.20, 0.21, 0.25]}
    ppl = {"a": [5.0, 6.0, 7.0], "b": [3.0, 3.5, 4.0], "c": [9.0, 8.0, 8.5]}
    for method in mse:
        for seed in range(3):
            write_run(tmp_path, method, seed, metrics={"mse": mse[method][seed], "perplexity": ppl[method][seed]},
                      train_s=10.0 + seed)
    return tmp_path, mse, ppl


def markdown_row(markdown: str, method: str) -> list[str]:
    line = next(line for line in markdown.splitlines() if line.startswith(f"| {method} "))
    return [cell.strip() for cell in line.strip("|").split("|")]


# --- tables ----------------------------------------------------------------------------------------------------

def test_quality_table_holds_mean_and_std_over_seeds_and_bolds_the_best_in_each_direction(grid):
    folder, mse, ppl = grid
    runs, records = runs_of(folder)
    table = summary_table(runs, QUALITY, "quality", "quality", null_reasons(runs, records))
    markdown = to_markdown(table)
    column = {name: i for i, name in enumerate(table.header)}
    for method in mse:
        row = markdown_row(markdown, method)
        expected_mse = f"{statistics.mean(mse[method]):.5f} ± {statistics.stdev(mse[method]):.5f}"
        expected_ppl = f"{statistics.mean(ppl[method]):.1f} ± {statistics.stdev(ppl[method]):.1f}"
        best_mse = min(mse, key=lambda m: statistics.mean(mse[m])) == method  # lower is better
        best_ppl = max(ppl, key=lambda m: statistics.mean(ppl[m])) == method  # higher is better
        assert row[column["MSE"]] == (f"**{expected_mse}**" if best_mse else expected_mse)
        assert row[column["perplexity"]] == (f"**{expected_ppl}**" if best_ppl else expected_ppl)
        assert row[column["seeds"]] == "3"
    assert "rFID" not in table.header  # all null: no column, and a note says why
    assert any("rFID" in note and "not measured in this test" in note for note in table.notes)


def test_quality_csv_holds_the_numbers_and_the_best_flag(grid, tmp_path):
    folder, mse, _ = grid
    build_report(folder, tmp_path / "out", figures=False)
    csv = pd.read_csv(tmp_path / "out" / "exp" / "photos" / "quality.csv")
    rows = csv[csv["metric"] == "mse"].set_index("method")
    for method, values in mse.items():
        assert rows.loc[method, "mean"] == pytest.approx(statistics.mean(values), rel=1e-5)
        assert rows.loc[method, "std"] == pytest.approx(statistics.stdev(values), rel=1e-5)
        assert rows.loc[method, "n"] == 3
    assert rows["best"].to_dict() == {"a": False, "b": True, "c": False}


def test_cost_table_says_what_cpu_peak_memory_includes(grid):
    folder, _, _ = grid
    runs, records = runs_of(folder)
    with_memory = summary_table(runs, COST, "cost", "cost")
    assert "peak memory (MB)" in with_memory.header
    assert any("high-water mark" in note and "separate processes" in note for note in with_memory.notes)
    runs["cost.peak_mem_mb"] = np.nan  # no column, so no caveat about it
    without = summary_table(runs, COST, "cost", "cost")
    assert "peak memory (MB)" not in without.header
    assert not any("high-water mark" in note for note in without.notes)


def test_latex_table_bolds_the_best_and_escapes_text(grid, tmp_path):
    folder, mse, _ = grid
    build_report(folder, tmp_path / "out", figures=False)
    tex = (tmp_path / "out" / "exp" / "photos" / "quality.tex").read_text()
    best = f"{statistics.mean(mse['b']):.5f} $\\pm$ {statistics.stdev(mse['b']):.5f}"
    assert f"\\textbf{{{best}}}" in tex
    assert "\\begin{tabular}" in tex and "\\bottomrule" in tex and "±" not in tex


def test_runs_of_one_method_with_different_options_are_not_averaged(tmp_path):
    for seed in range(2):
        write_run(tmp_path, "mq", seed, metrics={"mse": 0.1}, outer_every=2)
        write_run(tmp_path, "mq", seed, metrics={"mse": 0.3}, outer_every=4)
    runs, _ = runs_of(tmp_path)
    table = summary_table(runs, QUALITY, "quality", "quality")
    cells = {row[0]: row[table.header.index("MSE")] for row in table.rows}
    assert cells == {"mq (outer_every=2)": "0.10000 ± 0.00000", "mq (outer_every=4)": "0.30000 ± 0.00000"}


# --- paired differences ----------------------------------------------------------------------------------------

def test_paired_interval_matches_the_hand_computed_t_interval():
    reference = pd.Series({0: 1.0, 1: 2.0, 2: 3.0})
    method = pd.Series({0: 2.0, 1: 4.0, 2: 6.0, 3: 100.0})  # seed 3: the reference lacks it, so it is dropped
    d = paired_difference(method, reference)  # differences 1, 2, 3: mean 2, std 1, n 3
    half = T_975[2] * 1.0 / 3 ** 0.5
    assert d.n == 3
    assert d.mean == pytest.approx(2.0)
    assert (d.low, d.high) == (pytest.approx(2.0 - half, abs=1e-3), pytest.approx(2.0 + half, abs=1e-3))
    assert d.excludes_zero is False  # 2 - 2.484 < 0


def test_paired_interval_excludes_zero_for_a_consistent_difference():
    reference = pd.Series({0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0})
    method = pd.Series({0: 2.0, 1: 2.1, 2: 1.9, 3: np.nan})  # a null on one side drops seed 3
    d = paired_difference(method, reference)  # differences 1.0, 1.1, 0.9: mean 1, std 0.1
    half = T_975[2] * 0.1 / 3 ** 0.5
    assert d.n == 3 and d.mean == pytest.approx(1.0)
    assert d.low == pytest.approx(1.0 - half, abs=1e-4) and d.high == pytest.approx(1.0 + half, abs=1e-4)
    assert d.excludes_zero is True


def test_fewer_than_two_paired_seeds_is_reported_as_na(tmp_path):
    write_run(tmp_path, "ste", 0, metrics={"mse": 0.2})
    write_run(tmp_path, "ste", 1, metrics={"mse": 0.2})
    write_run(tmp_path, "ema", 1, metrics={"mse": 0.1})
    write_run(tmp_path, "ema", 2, metrics={"mse": 0.1})  # only seed 1 is paired
    runs, _ = runs_of(tmp_path)
    table = differences_table(runs, "ste")
    row = next(r for r in table.rows if r[0] == "MSE")
    assert row[1:] == ["ema", "n/a", "n/a", "1", "n/a"]


def test_differences_table_names_the_better_side_by_direction(grid):
    folder, mse, _ = grid
    runs, _ = runs_of(folder)
    table = differences_table(runs, "a")  # b's MSE is lower than a's on every seed by about 0.19
    row = next(r for r in table.rows if r[:2] == ["MSE", "b"])
    diffs = [b - a for a, b in zip(mse["a"], mse["b"])]
    assert row[2] == f"{statistics.mean(diffs):+.6f}"
    assert row[4] == "3" and row[5] == "yes (better)"


# --- equal compute ---------------------------------------------------------------------------------------------

def test_equal_compute_reads_each_curve_at_the_largest_time_all_runs_reach(tmp_path):
    fast = [{"step": 10, "train_s": 1.0, "mse": 0.5, "perplexity": 1, "usage": 0.1},
            {"step": 20, "train_s": 3.0, "mse": 0.3, "perplexity": 1, "usage": 0.1}]
    slow = [{"step": 10, "train_s": 2.0, "mse": 0.4, "perplexity": 1, "usage": 0.1},
            {"step": 20, "train_s": 4.0, "mse": 0.1, "perplexity": 1, "usage": 0.1},
            {"step": 30, "train_s": 6.0, "mse": 0.05, "perplexity": 1, "usage": 0.1}]
    write_run(tmp_path, "ste", 0, curves=fast)
    write_run(tmp_path, "mq", 0, curves=slow)
    build_report(tmp_path, tmp_path / "out", figures=False)
    table = pd.read_csv(tmp_path / "out" / "exp" / "photos" / "equal_compute.csv").set_index("method")
    horizon = min(3.0, 6.0)
    slow_at = 0.4 + (horizon - 2.0) / (4.0 - 2.0) * (0.1 - 0.4)  # between its points at 2 s and 4 s
    assert (table["time_s"] == horizon).all()
    assert table.loc["ste", "val_mse_mean"] == pytest.approx(0.3)
    assert table.loc["mq", "val_mse_mean"] == pytest.approx(slow_at)
    assert table.loc["mq", "step_mean"] == pytest.approx(15.0)


# --- figures ---------------------------------------------------------------------------------------------------

FIGURES = ["bar_mse", "bar_perplexity", "bar_usage", "curves", "code_frequency", "reconstructions",
           "quality_vs_cost"]


def test_every_figure_is_written_as_png_and_pdf_and_an_all_null_metric_is_skipped_aloud(grid, tmp_path, capsys):
    folder, _, _ = grid
    group = tmp_path / "figs" / "exp" / "photos"
    group.mkdir(parents=True)
    (group / "bar_rfid.png").write_bytes(PNG_MAGIC)  # left by an earlier report, when rFID had values
    (group / "notes.txt").write_text("mine")
    assert main([str(folder), "--out", str(tmp_path / "figs")]) == 0
    out = capsys.readouterr().out
    assert (group / "notes.txt").read_text() == "mine"  # not the report's: kept
    for name in FIGURES:
        png, pdf = (group / f"{name}.png").read_bytes(), (group / f"{name}.pdf").read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 1000, name
        assert pdf.startswith(PDF_MAGIC) and len(pdf) > 1000, name
    for null_metric in ("rfid", "gfid"):
        assert not (group / f"bar_{null_metric}.png").exists()
        assert re.search(f"skipped bar_{null_metric} .*not measured in this test", out)


def test_figures_regenerate_byte_for_byte(grid, tmp_path):
    """No timestamp, version string or random state reaches a PNG or PDF: the paper's figure set can be
    regenerated and compared, and an unchanged figure makes no diff."""
    folder, _, _ = grid
    first, second = tmp_path / "first", tmp_path / "second"
    build_report(folder, first)
    build_report(folder, second)
    figures_written = sorted(p.relative_to(first) for p in first.rglob("*") if p.suffix in (".png", ".pdf"))
    assert len(figures_written) >= 2 * len(FIGURES)
    for relative in figures_written:
        assert (first / relative).read_bytes() == (second / relative).read_bytes(), relative


def test_a_method_has_the_same_colour_in_every_figure(tmp_path):
    for seed in range(2):
        write_run(tmp_path, "mq", seed, experiment="one")
        write_run(tmp_path, "mq", seed, experiment="two")
        write_run(tmp_path, "ste", seed, experiment="two")
    runs, records = runs_of(tmp_path)
    colours = []
    for experiment in ("one", "two"):
        group = runs[runs["experiment"] == experiment]
        bars = figures.bar_figure(group, "metrics.mse", "MSE").axes[0].patches
        labels = sorted(group["method"].unique())
        colours.append(dict(zip(labels, [matplotlib_hex(p.get_facecolor()) for p in bars])))
        lines = figures.code_frequency_figure(group, records).axes[0].get_lines()
        colours.append({line.get_label(): matplotlib_hex(line.get_color())
                        for line in lines if line.get_label() in labels})
    assert all(c["mq"] == figures.method_colour("mq") for c in colours)
    assert colours[2]["ste"] == colours[3]["ste"] == figures.method_colour("ste") != figures.method_colour("mq")


def matplotlib_hex(colour) -> str:
    from matplotlib.colors import to_hex

    return to_hex(colour)


def test_registered_methods_get_distinct_colours():
    from methods import list_methods

    names = list_methods()
    assert {"ste", "ema", "mq"} <= set(names)
    assert len({figures.method_colour(name) for name in names}) == len(names)
    # a name no registration knows (a record of a method since removed) still gets a colour of its own
    assert figures.method_colour("not-registered") not in {figures.method_colour(name) for name in names}


def test_reconstruction_grid_shows_originals_then_seed_zero_of_each_method(tmp_path):
    for method, (seed0_pixel, seed1_pixel) in (("ema", (50, 60)), ("ste", (100, 110))):
        write_run(tmp_path, method, 1, pixel=seed1_pixel)
        write_run(tmp_path, method, 0, pixel=seed0_pixel)
    runs, records = runs_of(tmp_path)
    fig = figures.reconstruction_figure(runs, records)
    rows = [ax.images[0].get_array() for ax in fig.axes]
    seed0 = {m: runs[(runs["method"] == m) & (runs["seed"] == 0)]["path"].iloc[0] for m in ("ema", "ste")}
    with np.load(figures.samples_path(seed0["ema"])) as samples:
        assert np.array_equal(rows[0], figures.image_row(samples["original"]))
        assert np.array_equal(rows[1], figures.image_row(samples["reconstruction"]))
    with np.load(figures.samples_path(seed0["ste"])) as samples:
        assert np.array_equal(rows[2], figures.image_row(samples["reconstruction"]))
    assert len(rows) == 3


def test_code_frequency_curve_is_the_mean_of_sorted_normalized_histograms(tmp_path):
    write_run(tmp_path, "ste", 0, histogram=[0, 6, 2, 2, 0, 0, 0, 0])
    write_run(tmp_path, "ste", 1, histogram=[1, 1, 8, 0, 0, 0, 0, 0])
    runs, records = runs_of(tmp_path)
    line = next(l for l in figures.code_frequency_figure(runs, records).axes[0].get_lines() if l.get_label() == "ste")
    expected = (np.array([0.6, 0.2, 0.2]) + np.array([0.8, 0.1, 0.1])) / 2
    assert np.allclose(line.get_ydata(), expected)
    assert list(line.get_xdata()) == [1, 2, 3]


# --- grouping and errors ---------------------------------------------------------------------------------------

def test_records_of_different_experiments_and_datasets_never_mix(tmp_path):
    for seed in range(2):
        write_run(tmp_path, "ste", seed, experiment="small", metrics={"mse": 0.1})
        write_run(tmp_path, "ste", seed, experiment="large", metrics={"mse": 0.5})
        write_run(tmp_path, "ste", seed, experiment="large", dataset="cifar10", metrics={"mse": 0.9})
    build_report(tmp_path, tmp_path / "out", figures=False)
    means = {}
    for csv in (tmp_path / "out").rglob("quality.csv"):
        table = pd.read_csv(csv)
        mse = table[table["metric"] == "mse"]
        assert mse["n"].tolist() == [2]  # two seeds, not four or six
        means[(table["experiment"].iloc[0], table["dataset"].iloc[0])] = mse["mean"].iloc[0]
    assert means == {("small", "photos"): 0.1, ("large", "photos"): 0.5, ("large", "cifar10"): 0.9}
    frame, _ = load(tmp_path)
    printed = records_table(frame)
    assert re.findall(r"^### (.*)$", printed, re.M) == ["large / cifar10", "large / photos", "small / photos"]


def test_a_directory_without_records_is_one_clear_error_with_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no run records" in err and "\n" not in err


def test_an_unknown_reference_is_one_clear_error_with_exit_2(grid, capsys):
    folder, _, _ = grid
    assert main([str(folder), "--reference", "nosuch", "--no-figures"]) == 2
    err = capsys.readouterr().err.strip()
    assert "nosuch" in err and "a, b, c" in err and "\n" not in err


# --- determinism -----------------------------------------------------------------------------------------------

def regenerate(results: Path, out: Path, hash_seed: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": hash_seed}
    done = subprocess.run([sys.executable, "-m", "bench.report", str(results), "--out", str(out), "--no-figures"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_regenerating_gives_byte_identical_tables(grid, tmp_path):
    folder, _, _ = grid
    write_run(folder, "a", 0, experiment="other", metrics={"mse": 1 / 3})
    regenerate(folder, tmp_path / "first", "1")
    regenerate(folder, tmp_path / "second", "2")  # a different hash seed: no set or dict order leaks in
    first = sorted(p.relative_to(tmp_path / "first") for p in (tmp_path / "first").rglob("*") if p.is_file())
    second = sorted(p.relative_to(tmp_path / "second") for p in (tmp_path / "second").rglob("*") if p.is_file())
    assert first == second
    assert {p.suffix for p in first} == {".md", ".tex", ".csv"} and len(first) > 10
    for relative in first:
        assert (tmp_path / "first" / relative).read_bytes() == (tmp_path / "second" / relative).read_bytes()


def test_paper_mode_reads_the_committed_results_and_writes_their_report(grid, monkeypatch, capsys, tmp_path):
    folder, _, _ = grid
    monkeypatch.setattr("bench.report.cli.PAPER_RESULTS", folder)
    monkeypatch.setattr("bench.report.cli.PAPER_REPORT", tmp_path / "paper")
    assert main(["--paper", "--no-figures"]) == 0
    assert (tmp_path / "paper" / "report.md").read_text() in capsys.readouterr().out
    assert (tmp_path / "paper" / "exp" / "photos" / "quality.tex").exists()


TABLE_SUFFIXES = (".md", ".tex", ".csv")


def test_the_committed_tables_are_what_the_committed_records_regenerate(tmp_path):
    """The tables shipped in results/report/ are exactly what `bench.report --paper` makes of the shipped records,
    so nobody can edit a number in them by hand or forget to regenerate after changing the report."""
    committed = ROOT / "results" / "report"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "bench.report", "--paper", "--no-figures", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.suffix in TABLE_SUFFIXES)
    shipped = sorted(p.relative_to(committed) for p in committed.rglob("*") if p.suffix in TABLE_SUFFIXES)
    assert fresh == shipped and len(shipped) > 5
    for relative in shipped:
        assert (tmp_path / relative).read_bytes() == (committed / relative).read_bytes(), relative
