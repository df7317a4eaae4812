"""bench.perf: the side-by-side step-time benchmark (its numbers are machine facts; here only its bookkeeping)."""
import argparse

import pytest

from bench.perf import main, measure, summarize


def tiny_args(**overrides):
    values = dict(steps=1, rounds=3, warmup=1, batch_size=8, device="cpu", threads=0, phases=True)
    return argparse.Namespace(**{**values, **overrides})


def test_ratios_are_medians_of_per_round_ratios_not_ratios_of_medians():
    # round 3 is a slow spell for both methods; per-round ratios 1.4, 1.6, 1.1 -> median 1.4, while the ratio of
    # the medians would be 3.2 / 2 = 1.6
    times = {
        "ste": {"harness": [1.0, 2.0, 10.0], "bare": [1.0, 2.0, 8.0], "no-vq": [0.5, 1.0, 5.0]},
        "mq": {"harness": [1.4, 3.2, 11.0], "bare": [1.4, 1.6, 11.0], "no-vq": [0.7, 1.6, 1.0]},
    }
    frame = summarize(times, "ste").set_index("method")
    assert frame.loc["mq", "vs_ste"] == pytest.approx(1.4)
    assert frame.loc["mq", "step_ms"] == pytest.approx(3200.0)  # the median round, in ms
    assert frame.loc["mq", "bare_ms"] == pytest.approx(1600.0)
    assert frame.loc["mq", "harness_vs_bare"] == pytest.approx(1.0)  # ratios 1, 2, 1
    assert frame.loc["mq", "vs_no_vq"] == pytest.approx(2.0)  # ratios 2, 2, 11
    assert frame.loc["ste", "harness_vs_bare"] == pytest.approx(1.0)  # ratios 1, 1, 1.25


def test_without_the_reference_there_is_no_reference_column():
    times = {"mq": {"harness": [1.0], "bare": [1.0], "no-vq": [1.0]}}
    assert "vs_ste" not in summarize(times, "ste").columns


def test_every_method_is_timed_and_labelled_phases_are_split(one_thread):
    frame = measure(["ste", "mq"], tiny_args())
    assert list(frame["method"]) == ["ste", "mq"]
    assert (frame[["step_ms", "bare_ms", "no_vq_ms", "vs_no_vq", "harness_vs_bare", "vs_ste"]] > 0).all().all()
    # MQ labels its phases for the profiler; ste has none
    assert set(frame.attrs["phases"]["mq"]) >= {"mq/inner"} and not frame.attrs["phases"]["ste"]


def test_the_command_prints_one_row_per_method_and_adds_the_reference(one_thread, capsys):
    assert main(["--methods", "fsq", "--steps", "1", "--rounds", "2", "--warmup", "1", "--batch-size", "8",
                 "--device", "cpu", "--no-phases"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "method" not in line]
    assert [row.split("|")[1].strip() for row in rows] == ["ste", "fsq"]


def test_ranks_ratio_is_the_median_of_per_round_ratios():
    from bench.perf import summarize_ranks

    # round 2 is a slow spell for the one-process variant only: per-round ratios 1.1, 0.5, 1.2 -> 1.1
    times = {"ema": {"one-process": [1.0, 4.0, 1.0], "ranks": [1.1, 2.0, 1.2]}}
    row = summarize_ranks(times, 2).set_index("method").loc["ema"]
    assert row["ranks_vs_one_process"] == pytest.approx(1.1)
    assert row["one_process_ms"] == pytest.approx(1000.0) and row["ranks_2_ms"] == pytest.approx(1200.0)


def test_ranks_times_two_gloo_ranks_against_one_process_side_by_side(capsys):
    """`--ranks 2`: two spawned ranks in one process group and this process, one row per method."""
    assert main(["--ranks", "2", "--methods", "ste", "--steps", "1", "--rounds", "2", "--warmup", "1",
                 "--batch-size", "8", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "2 ranks (gloo) x 1 thread(s) with 4 rows each, against one process with 2 threads" in out
    (row,) = [line for line in out.splitlines() if line.startswith("| ste")]
    one_process, ranks, ratio = (float(cell) for cell in row.split("|")[2:5])
    assert one_process > 0 and ranks > 0 and ratio > 0


def test_ranks_refuses_a_global_batch_that_does_not_split(capsys):
    assert main(["--ranks", "2", "--methods", "ste", "--batch-size", "9", "--device", "cpu"]) == 2
    assert "--batch-size 9 (the global batch) does not split into 2 equal rank slices" in capsys.readouterr().err
