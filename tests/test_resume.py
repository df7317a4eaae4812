from tests.conftest import TINY, run_cli
from tests.resume import killed_and_resumed_metrics


def test_killed_run_resumes_to_bit_identical_metrics(tmp_path):
    resumed, uninterrupted, died_at = killed_and_resumed_metrics("ste", tmp_path, extra=TINY)
    assert resumed == uninterrupted  # floats compared exactly: bit for bit
    assert resumed["mse"] is not None and resumed["perplexity"] > 0


def test_finished_run_is_skipped_not_repeated(dirs):
    args = ["--methods", "ste", "--steps", "3", *TINY, "--out", str(dirs["out"]), "--scratch", str(dirs["scratch"]),
            "--quiet"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    (record,) = list(dirs["out"].rglob("*.json"))
    written = record.stat().st_mtime_ns
    second = run_cli(*args)
    assert second.returncode == 0 and "skip (record exists)" in second.stdout
    assert record.stat().st_mtime_ns == written
