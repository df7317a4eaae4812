"""bench.report.studies and bench.projection on synthetic records and tiny untrained models: the scaling table's
means, the ablation's paired t-intervals, the tuning winner from selection.json, the projection's PCA against an
independent numpy SVD, and byte-identical figures. Every expected number is computed here independently (numpy,
statistics, scipy.stats.t), never by calling the code under test."""
from __future__ import annotations

import copy
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import t as student_t

from bench.records import write_record
from bench.report import studies
from bench.spec import RunSpec

PNG_MAGIC, PDF_MAGIC = b"\x89PNG\r\n\x1a\n", b"%PDF-"
METRIC_NAMES = ("mse", "psnr", "ssim", "perplexity", "usage", "dead_codes", "quant_error", "rfid", "kid", "lpips",
                "gfid", "prior_bits_per_code")


@dataclass(frozen=True)
class Cell:
    """bench/study.py's Cell, as its contract states it (the tests do not need the real module)."""
    arm: str
    method: str
    point: dict
    seed: int
    phase: str
    trial: int | None
    spec: RunSpec = field(compare=False)


def study(name="s", kind="grid", figure="scaling", reference_arm=None, select_metric="mse"):
    return SimpleNamespace(name=name, kind=kind, figure=figure, reference_arm=reference_arm,
                           select_metric=select_metric)


def make_cell(folder: Path, arm: str, method: str, seed: int, metrics: dict | None = None, *, point=None,
              phase="grid", trial=None, status="complete", effective_k=None, eval_split="test", projection=None,
              method_stats=None, curves=None, **spec_values) -> tuple[Cell, dict]:
    """One cell and its record (written to folder/<experiment>/<run_id>.json, read back with its _path)."""
    point = dict(point or {})
    spec = RunSpec(method=method, seed=seed, experiment="study", steps=20,
                   **{**{"codebook_size": 64}, **point, **spec_values})
    values = {name: None for name in METRIC_NAMES}
    if status == "complete":
        values.update(metrics or {})
    record = {"experiment": "study", "run_id": spec.run_id(), "status": status,
              "spec": {**spec.to_dict(), "eval_split": eval_split},  # bench/study.py's trials: eval_split "val"
              "metrics": values, "cost": {"train_s": 1.0}, "null_reasons": {}, "curves": curves or [],
              "env": {"codebook_size": effective_k or spec.codebook_size}}
    if method_stats is not None:
        record["method_stats"] = method_stats
    if status == "diverged":
        record["divergence"] = {"step": 7, "last_finite_loss": 1.0}
    path = folder / "study" / f"{spec.run_id()}.json"
    write_record(path, record)
    if projection is not None:
        np.savez_compressed(path.with_suffix(".samples.npz"), original=np.zeros((1, 3, 4, 4), np.uint8),
                            reconstruction=np.zeros((1, 3, 4, 4), np.uint8),
                            **{f"pca_{k}": v for k, v in projection.items()})
    record["_path"] = str(path)
    return Cell(arm, method, point, seed, phase, trial, spec), record


def synthetic_projection(seed: int, k: int, used: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"features": rng.normal(size=(40, 2)).astype(np.float16),
            "codes": rng.normal(size=(k, 2)).astype(np.float16),
            "used": np.arange(k) < used, "explained": np.array([0.5, 0.25], np.float32),
            "note": np.array("synthetic")}


# --- scaling ------------------------------------------------------------------------------------------------------

SIZES = (1024, 64, 256)  # deliberately unsorted: columns and lines must come out 64, 256, 1024 (not text order)


@pytest.fixture
def scaling(tmp_path):
    """ste and fsq x K in SIZES x seeds 0-2; ste at K=256 seed 2 diverged; fsq's effective K at 1024 is 1000."""
    rng = np.random.default_rng(0)
    cells, values = [], {}
    for method in ("ste", "fsq"):
        for k in SIZES:
            for seed in (2, 0, 1):
                metrics = {"mse": float(rng.uniform(0.01, 0.05)), "usage": float(rng.uniform(0.1, 0.9)),
                           "perplexity": float(rng.uniform(5, 60)), "rfid": float(rng.uniform(100, 300))}
                gone = method == "ste" and k == 256 and seed == 2
                effective = 1000 if (method == "fsq" and k == 1024) else (240 if method == "fsq" and k == 256
                                                                          else None)
                projection = synthetic_projection(seed + k, min(k, 48), used=5) if seed == 0 else None
                cells.append(make_cell(tmp_path, method, method, seed, metrics, point={"codebook_size": k},
                                       status="diverged" if gone else "complete", effective_k=effective,
                                       projection=projection))
                if not gone:
                    values.setdefault((method, k), []).append(metrics)
    return tmp_path, cells, values


def test_scaling_table_means_and_stds_are_those_of_the_finished_seeds_in_numeric_k_order(scaling):
    folder, cells, values = scaling
    markdown, written, notes = studies.build_study_report(study(), cells, folder / "report", figures=False)
    csv = pd.read_csv(folder / "report" / "scaling.csv")
    for (method, k), runs in values.items():
        for name in ("mse", "usage", "perplexity", "rfid"):
            seeds = [r[name] for r in runs]
            row = csv[(csv["arm"] == method) & (csv["codebook_size"] == k) & (csv["metric"] == name)].iloc[0]
            assert row["mean"] == pytest.approx(statistics.mean(seeds), rel=1e-5), (method, k, name)
            assert row["std"] == pytest.approx(statistics.stdev(seeds), rel=1e-5), (method, k, name)
            assert (row["n"], row["min"], row["max"]) == (len(seeds), pytest.approx(min(seeds), rel=1e-5),
                                                          pytest.approx(max(seeds), rel=1e-5))
    for name, better in (("mse", min), ("rfid", min), ("usage", max), ("perplexity", max)):
        for k in SIZES:  # the best arm of each column, by the metric's direction
            means = {m: statistics.mean(r[name] for r in values[m, k]) for m in ("ste", "fsq")}
            flags = csv[(csv["codebook_size"] == k) & (csv["metric"] == name)].set_index("arm")["best"].to_dict()
            assert flags == {m: m == better(means, key=means.get) for m in means}, (name, k)
    header = next(line for line in markdown.splitlines() if line.startswith("| metric"))
    assert [c.strip() for c in header.strip("|").split("|")][2:] == ["K = 64", "K = 256", "K = 1024"]
    mse_ste = next(line for line in markdown.splitlines() if line.startswith("| MSE ") and "| ste " in line)
    cell_256 = [c.strip().strip("*") for c in mse_ste.strip("|").split("|")][3]
    kept = [r["mse"] for r in values["ste", 256]]
    assert cell_256 == f"{statistics.mean(kept):.5f} ± {statistics.stdev(kept):.5f} (n=2)"
    assert any("fsq" in n and "256 -> 240" in n and "1024 -> 1000" in n and "64 ->" not in n for n in
               markdown.splitlines())


def test_scaling_figure_lines_are_the_means_and_bands_span_min_to_max(scaling):
    folder, cells, values = scaling
    runs, _, _ = studies.study_frame(cells)
    runs = runs.assign(axis_value=runs["point.codebook_size"])
    fig = studies.scaling_figure(runs, "codebook_size", "t")
    mse_ax = fig.axes[2]  # usage, perplexity, MSE, rFID: all four have values here
    line = next(l for l in mse_ax.get_lines() if l.get_label() == "fsq")
    sizes = sorted(SIZES)
    assert list(line.get_xdata()) == sizes
    expected = [statistics.mean(r["mse"] for r in values["fsq", k]) for k in sizes]
    assert np.allclose(line.get_ydata(), expected)
    band = mse_ax.collections[[l.get_label() for l in mse_ax.get_lines()].index("fsq")]  # one band per line
    vertices = band.get_paths()[0].vertices
    for k in sizes:
        at = vertices[np.isclose(vertices[:, 0], k)][:, 1]
        mses = [r["mse"] for r in values["fsq", k]]
        assert (at.min(), at.max()) == (pytest.approx(min(mses)), pytest.approx(max(mses))), k


def test_a_scaling_study_without_rfid_draws_one_row_of_the_other_three_and_says_so(scaling):
    folder, cells, values = scaling
    runs, _, _ = studies.study_frame(cells)
    runs = runs.drop(columns=["metrics.rfid"]).assign(**{"metrics.rfid": None})
    fig = studies.scaling_figure(runs, "codebook_size", "t")
    assert [ax.get_ylabel() for ax in fig.axes] == ["test usage (higher is better)",
                                                     "test perplexity (higher is better)",
                                                     "test MSE (lower is better)"]
    assert "rFID not measured" in fig.get_suptitle()
    line = next(l for l in fig.axes[2].get_lines() if l.get_label() == "ste")
    assert np.allclose(line.get_ydata(), [statistics.mean(r["mse"] for r in values["ste", k]) for k in sorted(SIZES)])


def test_a_second_grid_axis_splits_the_arms_instead_of_averaging_them(tmp_path):
    cells = [make_cell(tmp_path, "ste", "ste", seed, {"mse": 0.01 * dim + seed / 1000},
                       point={"codebook_size": k, "code_dim": dim})
             for k in (64, 128) for dim in (4, 16) for seed in (0, 1)]
    studies.build_study_report(study(), cells, tmp_path / "report", figures=False)
    csv = pd.read_csv(tmp_path / "report" / "scaling.csv")
    mse = csv[csv["metric"] == "mse"].set_index(["arm", "codebook_size"])["mean"]
    assert sorted(set(csv["arm"])) == ["ste (code_dim=16)", "ste (code_dim=4)"]
    assert mse["ste (code_dim=4)", 64] == pytest.approx(0.0405)
    assert mse["ste (code_dim=16)", 128] == pytest.approx(0.1605)


# --- ablation ------------------------------------------------------------------------------------------------------

def t_interval(differences: list[float]) -> tuple[float, float, float]:
    n = len(differences)
    mean = statistics.mean(differences)
    half = student_t.ppf(0.975, n - 1) * statistics.stdev(differences) / math.sqrt(n)
    return mean, mean - half, mean + half


@pytest.fixture
def ablation(tmp_path):
    """ste (the reference) and two mq arms over seeds 0-3; "mq (mlp)" lacks seed 1 (no record), so only three
    of its seeds pair. Each arm's MSE shifts by a seed effect shared with the reference: pairing matters."""
    rng = np.random.default_rng(1)
    seed_effect = [0.0, 0.02, -0.015, 0.03]
    cells, mse = [], {}
    for arm, options, shift in (("ste", {}, 0.0), ("mq (identity)", {"hyper_net": "identity"}, -0.004),
                                ("mq (mlp)", {}, -0.002)):
        method = "ste" if arm == "ste" else "mq"
        for seed in range(4):
            value = 0.05 + seed_effect[seed] + shift + float(rng.normal(0, 0.001))
            if arm == "mq (mlp)" and seed == 1:
                cells.append((make_cell(tmp_path, arm, method, seed, method_options=options)[0], None))
                continue
            mse[arm, seed] = value
            cells.append(make_cell(tmp_path, arm, method, seed, {"mse": value, "rfid": 200 + 1000 * value},
                                   method_options=options,
                                   projection=synthetic_projection(seed, 16, 4) if seed == 0 else None))
    return tmp_path, cells, mse


def test_ablation_differences_are_the_paired_t_intervals_computed_with_scipy(ablation):
    folder, cells, mse = ablation
    markdown, _, notes = studies.build_study_report(study(figure="ablation", reference_arm="ste"), cells,
                                                    folder / "report", figures=False)
    table = pd.read_csv(folder / "report" / "differences.csv")
    fig_ax = None
    for arm in ("mq (identity)", "mq (mlp)"):
        seeds = sorted(s for a, s in mse if a == arm)
        mean, low, high = t_interval([mse[arm, s] - mse["ste", s] for s in seeds])
        row = table[(table["metric"] == "mse") & (table["method"] == arm)].iloc[0]
        assert row["n"] == len(seeds) == (3 if arm == "mq (mlp)" else 4)
        assert (row["mean_difference"], row["ci_low"], row["ci_high"]) == (
            pytest.approx(mean, rel=1e-5), pytest.approx(low, rel=1e-5), pytest.approx(high, rel=1e-5))
    assert any("1 cell(s) have no record" in n and "mq (mlp) (1)" in n for n in notes)
    # the figure's bottom row draws the same intervals: errorbar of arm i at x = i
    runs, _, _ = studies.study_frame(cells)
    fig = studies.ablation_figure(runs, "ste", "t")
    fig_ax = fig.axes[len(fig.axes) // 2]  # bottom row, first metric (MSE)
    others = ["mq (identity)", "mq (mlp)"]
    for x, arm in enumerate(others):
        seeds = sorted(s for a, s in mse if a == arm)
        mean, low, high = t_interval([mse[arm, s] - mse["ste", s] for s in seeds])
        segment = fig_ax.collections[x].get_segments()[0]  # the error bar of arm x: (x, low) -> (x, high)
        assert np.allclose(segment, [[x, low], [x, high]], rtol=1e-6), arm


def test_ablation_measurements_are_each_arms_method_stats_over_seeds_and_na_where_absent(tmp_path):
    flips = {("mq", s): 0.03 + 0.011 * s * s for s in range(3)} | {("mq (jvp)", s): 0.07 - 0.005 * s for s in range(3)}
    cells = [make_cell(tmp_path, "ste", "ste", s, {"mse": 0.05}) for s in range(3)]  # no method_stats at all
    for (arm, seed), flip in flips.items():
        options = {"hypergrad": "jvp"} if arm == "mq (jvp)" else {}
        cells.append(make_cell(tmp_path, arm, "mq", seed, {"mse": 0.04}, method_options=options,
                               method_stats={"flip_fraction": flip, "darts_norm": 0.1 * (seed + 1)}))
    studies.build_study_report(study(figure="ablation", reference_arm="ste"), cells, tmp_path / "report",
                               figures=False)
    table = pd.read_csv(tmp_path / "report" / "measurements.csv")
    for arm in ("mq", "mq (jvp)"):
        values = [flips[arm, s] for s in range(3)]
        row = table[(table["method"] == arm) & (table["metric"] == "flip_fraction")].iloc[0]
        assert (row["mean"], row["std"], row["n"]) == (pytest.approx(statistics.mean(values), rel=1e-5),
                                                       pytest.approx(statistics.stdev(values), rel=1e-5), 3)
        darts = table[(table["method"] == arm) & (table["metric"] == "darts_norm")].iloc[0]
        assert darts["mean"] == pytest.approx(0.2, rel=1e-5)
    ste = table[table["method"] == "ste"]
    assert (ste["n"] == 0).all() and set(ste["metric"]) == {"flip_fraction", "darts_norm"}
    markdown = (tmp_path / "report" / "measurements.md").read_text()
    ste_line = next(line for line in markdown.splitlines() if line.startswith("| ste "))
    assert ste_line.count("n/a") == 2


def test_an_ablation_over_a_grid_axis_gets_tables_per_point_never_averaged_over_points(tmp_path):
    mse = {("ste", 64, s): 0.05 + s / 100 for s in range(3)} | {("ste", 256, s): 0.04 + s / 100 for s in range(3)}
    mse |= {("ema", k, s): mse["ste", k, s] - (0.01 if k == 64 else 0.002 * (s + 1)) for k in (64, 256)
            for s in range(3)}
    cells = [make_cell(tmp_path, arm, arm, seed, {"mse": value}, point={"codebook_size": k})
             for (arm, k, seed), value in mse.items()]
    studies.build_study_report(study(figure="ablation", reference_arm="ste"), cells, tmp_path / "report",
                               figures=False)
    for k in (64, 256):
        table = pd.read_csv(tmp_path / "report" / f"differences_codebook_size-{k}.csv")
        row = table[(table["metric"] == "mse") & (table["method"] == "ema")].iloc[0]
        mean, low, high = t_interval([mse["ema", k, s] - mse["ste", k, s] for s in range(3)])
        assert (row["mean_difference"], row["ci_low"], row["ci_high"]) == (
            pytest.approx(mean), pytest.approx(low), pytest.approx(high))
        quality = pd.read_csv(tmp_path / "report" / f"quality_codebook_size-{k}.csv")
        assert quality[quality["metric"] == "mse"]["n"].tolist() == [3, 3]


# --- tuning ----------------------------------------------------------------------------------------------------------

@pytest.fixture
def tuning(tmp_path):
    """Two methods x 5 trials; selection.json names trial 2 for ste although trial 3 has the lowest value (its
    rule prefers fewer changes within noise): the report must mark 2. ste's trial 4 diverged. Final and default
    phases on seeds 0-2."""
    values = {"ste": [0.030, 0.028, 0.0205, 0.0200, None], "ema": [0.020, 0.025, 0.019, 0.022, 0.024]}
    winners = {"ste": 2, "ema": 2}
    settings = {0: {}, 1: {"lr": 0.0004}, 2: {"method.commitment_weight": 0.5},  # as bench/study.py writes them
                3: {"lr": 0.0004, "method.commitment_weight": 1.0}, 4: {"lr": 0.001}}
    cells, selection = [], {"metric": "mse", "split": "val", "rule": "fewest changes within 1 std", "methods": {}}
    for method, trial_values in values.items():
        trials = []
        for trial, value in enumerate(trial_values):
            cell, record = make_cell(tmp_path, method, method, 0, {"mse": value}, phase="trial", trial=trial,
                                     status="diverged" if value is None else "complete", eval_split="val",
                                     lr=2e-4 * (1 + trial))
            cells.append((cell, record))
            trials.append({"trial": trial, "settings": settings[trial], "run_ids": [cell.spec.run_id()],
                           "status": "diverged" if value is None else "complete", "value": value})
        selection["methods"][method] = {"winner": winners[method], "trials": trials}
    test_mse = {("ste", "default"): [0.040, 0.043, 0.039], ("ste", "final"): [0.035, 0.036, 0.036],
                ("ema", "default"): [0.030, 0.031, 0.033], ("ema", "final"): [0.031, 0.030, 0.032]}
    for (method, phase), mses in test_mse.items():
        for seed, value in enumerate(mses):
            cells.append(make_cell(tmp_path, method, method, seed, {"mse": value, "rfid": 100 + 1000 * value},
                                   phase=phase, lr=3e-4 if phase == "final" else 2e-4,
                                   projection=synthetic_projection(seed, 16, 6) if phase == "final" else None))
    return tmp_path, cells, selection, values, test_mse


def test_tuning_marks_the_winner_selection_json_names_and_compares_tuned_with_default(tuning):
    folder, cells, selection, values, test_mse = tuning
    out = folder / "report"
    markdown, written, notes = studies.build_study_report(study(kind="tune", figure="tuned"), cells, out,
                                                          selection=selection, figures=False)
    table = pd.read_csv(out / "tuned_vs_default.csv").set_index("method")
    assert table.loc["ste", "winner"] == 2 and table.loc["ste", "val_tuned"] == pytest.approx(values["ste"][2])
    assert table.loc["ste", "val_default"] == pytest.approx(values["ste"][0])
    assert table.loc["ste", "diverged"] == 1
    row = next(line for line in markdown.splitlines() if line.startswith("| ste "))
    assert "method.commitment_weight=0.5" in row and "lr=" not in row
    assert not any("evaluated on" in n for n in notes)  # trials on val, final and default on test: as they should
    for method in ("ste", "ema"):
        mean, low, high = t_interval([f - d for f, d in zip(test_mse[method, "final"], test_mse[method, "default"])])
        assert (table.loc[method, "test_mse_diff"], table.loc[method, "test_mse_ci_low"],
                table.loc[method, "test_mse_ci_high"]) == (pytest.approx(mean, rel=1e-5), pytest.approx(low, rel=1e-5),
                                                           pytest.approx(high, rel=1e-5))
    final = pd.read_csv(out / "final.csv")
    final_mse = final[final["metric"] == "mse"].set_index("method")
    assert final_mse.loc["ste", "mean"] == pytest.approx(statistics.mean(test_mse["ste", "final"]))
    assert final_mse["best"].to_dict() == {"ema": True, "ste": False}
    # the figure: the star sits on selection.json's winner, not on the lowest value; the diverged trial on top
    fig = studies.tuning_figure(selection, studies.METRIC["mse"], "t")
    ste_ax = next(ax for ax in fig.axes if ax.get_title().startswith("ste:"))
    marks = {c.get_label(): c.get_offsets() for c in ste_ax.collections}
    assert np.allclose(marks["winner"], [[2, values["ste"][2]]])
    assert marks["diverged"][0][0] == 4 and marks["diverged"][0][1] > max(v for v in values["ste"] if v is not None)
    assert np.allclose(marks["defaults (trial 0)"], [[0, values["ste"][0]]])


def test_without_selection_json_the_winner_is_rebuilt_from_the_trial_records_and_said(tuning):
    folder, cells, _, values, _ = tuning
    _, _, notes = studies.build_study_report(study(kind="tune", figure="tuned"), cells, folder / "report",
                                             figures=False)
    table = pd.read_csv(folder / "report" / "tuned_vs_default.csv").set_index("method")
    assert table.loc["ste", "winner"] == 3  # the lowest validation MSE of ste's finished trials
    assert table.loc["ema", "winner"] == 2
    assert any("no selection.json" in n for n in notes)


def test_convergence_is_each_final_curve_over_its_end_value_averaged_over_seeds(tmp_path):
    shapes = {"ste": [[2.0, 1.5, 1.2, 1.04, 1.0], [2.4, 1.7, 1.3, 1.06, 1.0], [1.9, 1.4, 1.1, 1.03, 1.0]],
              "ema": [[1.3, 1.08, 1.06, 1.01, 1.0], [1.2, 1.02, 1.01, 1.0, 1.0], [1.4, 1.03, 1.02, 1.02, 1.0]]}
    steps = [100, 200, 300, 400, 500]
    cells = [make_cell(tmp_path, "ste", "ste", 0, {"mse": 0.5}, phase="trial", trial=0, eval_split="val",
                       curves=[{"step": s, "mse": 9.0} for s in steps])]  # a trial: not in the table
    for method, curves in shapes.items():
        for seed, ratios in enumerate(curves):
            end = 0.01 * (seed + 1)  # each run's own end value: the ratios must not depend on it
            curve = [{"step": s, "train_s": float(s), "mse": r * end, "usage": 0.1} for s, r in zip(steps, ratios)]
            cells.append(make_cell(tmp_path, method, method, seed, {"mse": end}, phase="final", curves=curve))
    selection = {"metric": "mse", "methods": {m: {"winner": 0, "trials": []} for m in shapes}}
    studies.build_study_report(study(kind="tune", figure="tuned"), cells, tmp_path / "report", selection=selection,
                               figures=False)
    table = pd.read_csv(tmp_path / "report" / "convergence.csv")
    for method, curves in shapes.items():
        mine = table[table["method"] == method].set_index("step")
        expected = [statistics.mean(c[i] for c in curves) for i in range(len(steps))]
        assert mine["ratio_to_end"].tolist() == pytest.approx(expected, rel=1e-5)
        flat = next(s for i, s in enumerate(steps) if all(abs(e - 1) <= 0.05 for e in expected[i:]))
        assert (mine["flat_from"] == flat).all() and (mine["seeds"] == 3).all()
    assert table[table["method"] == "ste"]["flat_from"].iloc[0] == 400  # ema flattens earlier: 200
    assert table[table["method"] == "ema"]["flat_from"].iloc[0] == 200


# --- the projection ----------------------------------------------------------------------------------------------

def tiny_model(method: str, model: str = "vqvae"):
    from bench.models import build_model

    torch.manual_seed(0)
    options = {"z_channels": 8, "num_res_blocks": 1} if model == "vqvae-mq" else {}
    spec = RunSpec(method=method, model=model, width=16, res_blocks=1, res_width=8, code_dim=8, codebook_size=32,
                   model_options=options)
    return build_model(spec)


def numpy_pca(rows: np.ndarray):
    mean = rows.mean(0)
    _, s, vt = np.linalg.svd(rows - mean, full_matrices=False)
    return mean, vt[:2], (s[:2] ** 2) / (s ** 2).sum()


def same_up_to_sign(actual: np.ndarray, expected: np.ndarray, atol: float) -> bool:
    """Columns equal up to one sign per column (a principal axis has no sign of its own)."""
    signs = np.sign((actual * expected).sum(0))
    return np.allclose(actual, expected * signs, atol=atol)


@pytest.mark.parametrize("method", ["ste", "ste-ln", "rvq"])  # ste on vqvae-mq, whose BatchNorm needs eval mode
def test_projection_is_the_pca_of_what_the_search_receives_with_every_code_projected(method, one_thread,
                                                                                     monkeypatch):
    from bench import projection
    from bench.projection import codebook_projection

    monkeypatch.setattr(projection, "CHUNK", 5)  # several chunks of codes, the last one short

    model = tiny_model(method, "vqvae-mq" if method == "ste" else "vqvae")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    depth = getattr(model.quantizer, "code_depth", 1)
    histogram = np.zeros((depth, 32), dtype=int)
    histogram[0, [1, 5, 7]] = [3, 1, 9]
    if depth > 1:
        histogram[1, [2, 3]] = 4  # a later level's use does not make a first-level code used
    out = codebook_projection(model, images, histogram if depth > 1 else histogram[0])
    assert model.training  # left as it was, and nothing in it changed (BatchNorm's running statistics)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        z = copy.deepcopy(model.encoder).eval()(images.float() / 127.5 - 1.0)  # BatchNorm: running statistics
        if method == "ste-ln":  # the LayerNorm over the channels, applied by hand
            ln = model.quantizer.pre.norm
            z = torch.nn.functional.layer_norm(z.permute(0, 2, 3, 1), (8,), ln.weight, ln.bias,
                                               ln.eps).permute(0, 3, 1, 2)
        rows = z.permute(0, 2, 3, 1).reshape(-1, 8).double().numpy()
        if method == "rvq":
            codes = model.quantizer.rvq.codebooks[0].double().numpy()  # the first level's codebook
        else:
            codes = model.quantizer.codebook.weight.double().numpy()
    mean, components, explained = numpy_pca(rows)
    assert out["features"].shape == (6 * 8 * 8, 2) and out["codes"].shape == (32, 2)
    assert np.allclose(out["explained"], explained, rtol=1e-4)
    scale = np.abs(rows - mean).max()
    assert same_up_to_sign(out["features"].astype(float), (rows - mean) @ components.T, atol=2e-3 * scale)
    expected_codes = (codes - mean) @ components.T  # centred by the features' mean, not the codes'
    signs = np.sign(((out["features"].astype(float)) * ((rows - mean) @ components.T)).sum(0))
    assert np.allclose(out["codes"].astype(float), expected_codes * signs, atol=2e-3 * max(scale, 1.0))
    assert out["used"].tolist() == [i in (1, 5, 7) for i in range(32)]
    assert np.allclose(out["components"], components * signs[:, None], atol=1e-5)


def test_projection_is_deterministic_and_its_signs_are_fixed(one_thread):
    from bench.projection import codebook_projection

    model = tiny_model("fc")
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    first = codebook_projection(model, images, np.ones(32))
    second = codebook_projection(model, images, np.ones(32))
    assert all(np.array_equal(first[k], second[k]) for k in first)
    components = first["components"]
    assert (components[np.arange(2), np.abs(components).argmax(1)] > 0).all()


# --- figures: written, deterministic; the codebook figure reads the runs' arrays --------------------------------

def figure_files(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.suffix in (".png", ".pdf"))


@pytest.mark.parametrize("kind", ["scaling", "ablation", "tuning"])
def test_study_figures_are_written_and_regenerate_byte_for_byte(kind, request):
    folder, cells, *rest = request.getfixturevalue(kind)
    arguments = {"scaling": (study(), {}), "ablation": (study(figure="ablation", reference_arm="ste"), {}),
                 "tuning": (study(kind="tune", figure="tuned"), {"selection": rest[0] if rest else None})}[kind]
    first = studies.build_study_report(arguments[0], cells, folder / "first", **arguments[1])[1]
    studies.build_study_report(arguments[0], cells, folder / "second", **arguments[1])
    stems = {"scaling": ["scaling", "codebook_features"], "ablation": ["ablation", "codebook_features"],
             "tuning": ["tuning", "codebook_features"]}[kind]
    files = figure_files(folder / "first")
    assert files == sorted(Path(f"{s}{x}") for s in stems for x in (".png", ".pdf"))
    assert files == figure_files(folder / "second")
    for relative in files:
        data = (folder / "first" / relative).read_bytes()
        assert data.startswith(PNG_MAGIC if relative.suffix == ".png" else PDF_MAGIC) and len(data) > 1000
        assert data == (folder / "second" / relative).read_bytes(), relative
    assert (folder / "first" / "report.md") in first


def test_codebook_figure_shows_seed_zero_with_used_and_dead_codes_apart(ablation):
    folder, cells, _ = ablation
    runs, _, _ = studies.study_frame(cells)
    fig, notes = studies.codebook_figure(runs, None, "t")
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title().split("\n")[0] for ax in panels] == ["mq (identity), seed 0", "mq (mlp), seed 0",
                                                                "ste, seed 0"]
    expected = synthetic_projection(0, 16, 4)
    marks = {c.get_label(): c.get_offsets() for c in panels[0].collections}
    codes = expected["codes"].astype(float)
    assert np.allclose(marks["used code"], codes[:4]) and np.allclose(marks["dead code"], codes[4:])
    assert np.allclose(marks["features"], expected["features"].astype(float))
    assert panels[0].get_title().endswith("4 of 16 codes used")


def test_a_run_without_projection_arrays_is_left_out_with_a_note(scaling):
    folder, cells, _ = scaling
    removed = next(Path(r["_path"]) for c, r in cells if c.arm == "ste" and c.seed == 0
                   and c.point["codebook_size"] == 64)
    removed.with_suffix(".samples.npz").unlink()
    runs, _, _ = studies.study_frame(cells)
    fig, notes = studies.codebook_figure(runs.assign(axis_value=runs["point.codebook_size"]), "codebook_size", "t")
    assert any("ste seed 0 at 64 left out (no " in n for n in notes)
    titles = [ax.get_title().split("\n")[0] for ax in fig.axes if ax.get_visible()]
    assert titles == ["fsq, K=64, seed 0", "fsq, K=1024, seed 0", "ste, K=1024, seed 0"]  # smallest, largest K


def test_a_trial_record_evaluated_on_the_test_split_is_reported(tmp_path):
    cells = [make_cell(tmp_path, "ste", "ste", 0, {"mse": 0.02 + trial / 100}, phase="trial", trial=trial,
                       eval_split="test" if trial == 1 else "val", lr=1e-4 * (trial + 1)) for trial in range(2)]
    _, _, notes = studies.build_study_report(study(kind="tune", figure="tuned"), cells, tmp_path / "report",
                                             figures=False)
    assert any(n.startswith("1 trial record(s) were evaluated on test, not val") for n in notes)
