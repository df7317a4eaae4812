"""bench.perf: the side-by-side step-time benchmark (its numbers are machine facts; here only its bookkeeping)."""
import argparse

from bench.perf import main, measure


def tiny_args(**overrides):
    values = dict(steps=1, rounds=3, warmup=1, batch_size=8, device="cpu", threads=0, phases=True)
    return argparse.Namespace(**{**values, **overrides})


def test_every_method_is_timed_in_every_round_and_ratios_are_per_round_medians(one_thread):
    frame = measure(["ste", "mq"], tiny_args())
    assert list(frame["method"]) == ["ste", "mq"]
    ste = frame.set_index("method").loc["ste"]
    assert ste["vs_ste"] == 1.0  # each round's ratio of ste to itself
    assert (frame[["step_ms", "bare_ms", "no_vq_ms", "vs_no_vq", "harness_vs_bare", "vs_ste"]] > 0).all().all()
    # MQ labels its phases for the profiler; ste has none
    assert set(frame.attrs["phases"]["mq"]) >= {"mq/inner"} and not frame.attrs["phases"]["ste"]


def test_the_command_prints_one_row_per_method_and_adds_the_ste_reference(one_thread, capsys):
    assert main(["--methods", "fsq", "--steps", "1", "--rounds", "2", "--warmup", "1", "--batch-size", "8",
                 "--device", "cpu", "--no-phases"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "method" not in line]
    assert [row.split("|")[1].strip() for row in rows] == ["ste", "fsq"]
