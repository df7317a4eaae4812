"""Every registered method runs through `bench.run` and lands a record with every metric of the protocol."""
import json
import math

import pytest

from bench.metrics import PROTOCOL_METRICS
from bench.records import RECORD_KEYS
from bench.run import main
from methods import list_methods
from tests.conftest import TINY

METHODS = [m for m in list_methods() if not m.startswith("test-")]


@pytest.mark.parametrize("method", METHODS)
def test_method_runs_through_the_harness_to_a_full_record(method, dirs, one_thread):
    code = main(["--methods", method, "--steps", "4", "--set", "eval_every=2", *TINY, "--codebook-size", "256", "--out", str(dirs["out"]),
                 "--scratch", str(dirs["scratch"]), "--quiet"])
    assert code == 0
    (path,) = dirs["out"].rglob("*.json")
    record = json.loads(path.read_text())
    assert set(RECORD_KEYS) <= set(record)
    assert record["spec"]["method"] == method
    for name in PROTOCOL_METRICS:
        assert name in record["metrics"], name
        value = record["metrics"][name]
        if value is None:
            assert record["null_reasons"].get(name), f"{name} is null without a reason"
        else:
            assert math.isfinite(value), name
    for name in ("mse", "psnr", "ssim", "perplexity", "usage", "dead_codes", "quant_error"):
        assert record["metrics"][name] is not None, name
    k = record["env"]["codebook_size"]
    depth = record["env"]["code_depth"]  # codes per position: a (depth, K) histogram where it is above 1
    histogram = record["env"]["code_histogram"]
    if depth > 1:  # the overall statistics count the K * depth codebook vectors as one codebook
        assert [len(level) for level in histogram] == [k] * depth
        histogram, k = [count for level in histogram for count in level], k * depth
    assert len(histogram) == k
    assert sum(histogram) == record["env"]["test_images"] * 8 * 8 * depth  # every code of the test split (8x8)
    # the codebook statistics from the codes' histogram, by hand: never from each other
    used = sum(1 for count in histogram if count > 0)
    total = sum(histogram)
    entropy = -sum(count / total * math.log(count / total) for count in histogram if count > 0)
    assert record["metrics"]["dead_codes"] == k - used
    assert record["metrics"]["usage"] == pytest.approx(used / k, rel=1e-12)
    assert record["metrics"]["perplexity"] == pytest.approx(math.exp(entropy), rel=1e-9)
    assert [c["step"] for c in record["curves"]] == [2, 4]
