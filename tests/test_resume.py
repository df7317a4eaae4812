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


def test_cpu_runs_make_library_codebook_gradients_reproducible_across_threads(tmp_path):
    """vector-quantize-pytorch gathers codes by indexing, whose CPU backward adds rows in a thread-dependent
    order (simvq's gradients differed between identical calls on 2 threads); a CPU Trainer turns on torch's
    deterministic kernels for its run, under which they agree bit for bit, and turns them off again after."""
    import torch

    from bench.train import Trainer
    from methods import create_method
    from tests.conftest import tiny_spec

    torch.use_deterministic_algorithms(False)
    with Trainer(tiny_spec(method="simvq", device="cpu"), tmp_path, tmp_path, progress=False) as trainer:
        trainer.setup()
        assert torch.are_deterministic_algorithms_enabled()
        torch.set_num_threads(2)
        grads = []
        for _ in range(3):
            torch.manual_seed(0)
            quantizer = create_method("simvq", dim=64, codebook_size=512)
            out = quantizer(torch.randn(128, 64, 8, 8, generator=torch.Generator().manual_seed(1)))
            (out.quantized.square().mean() + out.aux_loss).backward()
            grads.append(torch.cat([p.grad.flatten() for p in quantizer.parameters() if p.grad is not None]))
        assert all(torch.equal(grads[0], g) for g in grads[1:])
    assert not torch.are_deterministic_algorithms_enabled()  # the run's settings end with it
