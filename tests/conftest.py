import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# A VQ-VAE small enough that a training step takes milliseconds on the CPU. rFID is off (a real Inception pass
# over the test split takes about a minute here); tests/test_evaluation.py runs the FID path end to end.
TINY = ["--set", "width=16", "--set", "res_blocks=1", "--set", "res_width=8", "--code-dim", "8",
        "--codebook-size", "32", "--batch-size", "32", "--set", "warmup_steps=2", "--set", "eval_batch_size=1000",
        "--no-fid"]


def tiny_spec(**overrides):
    from bench.spec import RunSpec

    values = dict(method="ste", width=16, res_blocks=1, res_width=8, code_dim=8, codebook_size=32, batch_size=32,
                  warmup_steps=2, steps=6, eval_every=3, ckpt_every=3, eval_batch_size=1000, fid=False)
    values.update(overrides)
    return RunSpec(**values)


def run_cli(*args, timeout=600, **kwargs):
    """`python -m bench.run ARGS` in a fresh process, as a user would type it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "bench.run", *args], cwd=kwargs.pop("cwd", ROOT), env=env,
                          capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.fixture
def one_thread():
    """Tiny ops run fastest, and exactly reproducibly, on one intra-op thread; restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def torch_settings_restored():
    """A Trainer restores torch's process-wide settings when its run ends; a test that calls setup() by hand and
    never close() would leave them changed for the tests after it: put them back."""
    import torch

    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    yield
    torch.set_num_threads(saved[0])
    torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])


@pytest.fixture
def dirs(tmp_path):
    return {"out": tmp_path / "results", "scratch": tmp_path / "runs"}
