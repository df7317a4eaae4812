"""The stage-2 prior (bench/prior.py): it learns, it is causal, its samples decode, it is reproducible."""
import math

import pytest
import torch

from bench.datasets import ImageSplits
from bench.models import build_model
from bench.prior import (CodePrior, PriorConfig, bits_per_code, code_grids, run_stage2, sample_images,
                         train_prior)
from bench.spec import RunSpec
from methods import Quantizer

K = 16
TINY_PRIOR = dict(layers=1, heads=2, width=32, dropout=0.0, batch_size=32, warmup_steps=5)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny ops run fastest on one thread


def tiny_model(seed=0):
    torch.manual_seed(seed)
    spec = RunSpec(method="ste", width=16, res_blocks=1, res_width=8, code_dim=8, codebook_size=K)
    return build_model(spec)  # 32x32 images -> 8x8 code grids


def tiny_data():
    g = torch.Generator().manual_seed(0)
    draw = lambda n: torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)  # noqa: E731
    return ImageSplits("random", draw(64), draw(32), draw(8))


def row_grids(n, seed, h=4, w=4):
    """Grids whose every row repeats one uniformly drawn code: 4 bits per row, so 1 bit per code of a 4x4 grid."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, K, (n, h, 1), generator=g)
    return rows.expand(n, h, w).contiguous()


def test_prior_learns_a_structured_grid_distribution_below_the_uniform_baseline():
    config = PriorConfig(**TINY_PRIOR, steps=150, lr=3e-3)
    prior, held_out = train_prior(row_grids(512, seed=1), K, config, "cpu", held_out=row_grids(256, seed=2))
    assert held_out < 0.5 * math.log2(K), held_out  # uniform: 4 bits; the true entropy: 1 bit per code
    assert held_out == pytest.approx(bits_per_code(prior, row_grids(256, seed=2)))


def test_prior_logits_are_causal():
    torch.manual_seed(0)
    prior = CodePrior(K, (4, 4), layers=2, heads=2, width=32).eval()
    codes = torch.randint(0, K, (3, 16))
    tokens = prior.inputs(codes)  # (3, 16): start token, then codes 1..15
    changed = tokens.clone()
    changed[:, 9] = (changed[:, 9] + 1) % K
    with torch.no_grad():
        before, after = prior(tokens), prior(changed)
    assert torch.equal(before[:, :9], after[:, :9])  # positions before the change do not see it
    assert not torch.allclose(before[:, 9], after[:, 9])  # the changed position does


def test_cached_sampling_agrees_with_the_full_forward_pass():
    torch.manual_seed(0)
    prior = CodePrior(K, (3, 4), layers=2, heads=2, width=32).eval()
    greedy = prior.sample(5, top_k=1)  # each code is the argmax given the ones drawn before, via the KV cache
    with torch.no_grad():
        logits = prior(prior.inputs(greedy.flatten(1)))  # (5, 12, K), no cache
    assert torch.equal(logits.argmax(-1), greedy.flatten(1))


def test_samples_have_the_grid_shape_and_codebook_range():
    torch.manual_seed(0)
    prior = CodePrior(K, (8, 8), layers=1, heads=2, width=32).eval()
    grids = prior.sample(6)
    assert grids.shape == (6, 8, 8) and grids.dtype == torch.int64
    assert int(grids.min()) >= 0 and int(grids.max()) < K
    assert len(grids.unique()) > 1  # temperature 1 over a near-uniform prior draws many codes


def test_top_k_keeps_only_the_k_most_likely_codes():
    torch.manual_seed(0)
    prior = CodePrior(K, (1, 1), layers=1, heads=2, width=32).eval()  # one position: its logits are fixed
    with torch.no_grad():
        allowed = prior(prior.inputs(torch.zeros(1, 1, dtype=torch.long)))[0, 0].topk(3).indices
    drawn = prior.sample(200, top_k=3).flatten().unique()
    assert set(drawn.tolist()) <= set(allowed.tolist()) and len(drawn) > 1


def test_code_grids_are_the_models_eval_indices():
    model, data = tiny_model(), tiny_data()
    grids = code_grids(model, data.val, batch_size=10)
    assert grids.shape == (32, 8, 8) and grids.dtype == torch.int64 and model.training
    model.eval()
    with torch.no_grad():
        expected = model(model.preprocess(data.val))[1].indices
    assert torch.equal(grids, expected)


def test_sample_images_are_uint8_images_of_the_dataset_size():
    model = tiny_model()
    prior, _ = train_prior(torch.randint(0, K, (40, 8, 8)), K, PriorConfig(**TINY_PRIOR, steps=2), "cpu")
    images = sample_images(model, prior, 5, PriorConfig(**TINY_PRIOR), "cpu", batch_size=2)
    assert images.shape == (5, 3, 32, 32) and images.dtype == torch.uint8
    assert images.float().std() > 0


def test_run_stage2_is_reproducible_and_leaves_the_global_rng_alone():
    model, data = tiny_model(), tiny_data()
    config = PriorConfig(**TINY_PRIOR, steps=10, samples=6)
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    first, info = run_stage2(model, data, K, config, "cpu")
    assert torch.equal(torch.get_rng_state(), rng_before)
    second, info_again = run_stage2(model, data, K, config, "cpu")
    assert first.shape == (6, 3, 32, 32) and first.dtype == torch.uint8
    assert torch.equal(first, second)
    assert info["prior_bits_per_code"] == info_again["prior_bits_per_code"]
    assert 0 < info["prior_bits_per_code"] < 2 * math.log2(K) and "null_reason" not in info
    other, info_other = run_stage2(model, data, K, PriorConfig(**TINY_PRIOR, steps=10, samples=6, seed=1), "cpu")
    assert not torch.equal(first, other)
    assert info_other["prior_bits_per_code"] != info["prior_bits_per_code"]


class CodesOnly(Quantizer):
    """A quantizer that emits codes but cannot map indices back to its output."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.codebook_size, self.dim = inner, inner.codebook_size, inner.dim

    def forward(self, z):
        return self.inner(z)


def test_a_quantizer_without_decode_indices_gets_a_reason_and_still_its_bits_per_code():
    model = tiny_model()
    model.quantizer = CodesOnly(model.quantizer)
    samples, info = run_stage2(model, tiny_data(), K, PriorConfig(**TINY_PRIOR, steps=2, samples=4), "cpu")
    assert samples is None
    assert "decode_indices" in info["null_reason"] and "CodesOnly" in info["null_reason"]
    assert math.isfinite(info["prior_bits_per_code"])


def test_stage2_runs_under_bf16_autocast():
    """The GPU presets run stage 2 under bf16 autocast; the KV cache and the losses must accept its dtypes."""
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    config = PriorConfig(**TINY_PRIOR, steps=3, samples=4)
    samples, info = run_stage2(tiny_model(), tiny_data(), K, config, "cpu", autocast)
    assert samples.shape == (4, 3, 32, 32) and samples.dtype == torch.uint8
    assert math.isfinite(info["prior_bits_per_code"])
