"""Every metric of the record on non-trivial inputs, against a hand computation or the reference library.

MSE and PSNR: per image, then the mean over images (PSNR = 10 log10(1 / MSE_image)), by hand and by
torchmetrics; SSIM: torchmetrics on images that differ; perplexity, usage and dead codes: a histogram chosen so
that the expected numbers are closed forms; quant_error: the mean over images whatever the batching; KID: the
unbiased MMD^2 with the cubic polynomial kernel written out here, and torch-fidelity's own KID at its defaults.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from bench.fid import kernel_inception_distance
from bench.metrics import codebook_stats, evaluate_split, mean_batch_perplexity
from methods.base import QuantizerOutput

N, SIZE, K = 10, 16, 8
# a histogram over N * 2 * 2 = 40 positions with p = (1/2, 1/4, 1/8, 1/8, 0, 0, 0, 0):
# entropy = 1.75 ln 2, so perplexity = 2^1.75; 4 of 8 codes used; 4 dead
COUNTS = [20, 10, 5, 5, 0, 0, 0, 0]
PERPLEXITY = 2 ** 1.75


def gen(seed):
    return torch.Generator().manual_seed(seed)


class Scripted(nn.Module):
    """A model whose reconstructions, codes and quantization errors are given per image, in the order
    evaluate_split walks the split (batch after batch)."""

    def __init__(self, fakes: torch.Tensor, codes: torch.Tensor, quant_errors: torch.Tensor):
        super().__init__()
        self.fakes, self.codes, self.quant_errors = fakes, codes, quant_errors
        self.quantizer = type("Q", (), {"codebook_size": K})()
        self.position = 0

    @staticmethod
    def preprocess(images):
        return images.float() / 255

    @staticmethod
    def postprocess(x):
        return x

    def forward(self, x):
        batch = slice(self.position, self.position + len(x))
        self.position += len(x)
        zero = x.new_zeros(())
        error = self.quant_errors[batch].mean()  # the quantizer's figure is a mean over its batch
        return self.fakes[batch], QuantizerOutput(self.fakes[batch], self.codes[batch], zero, error)


def scripted_split():
    real = torch.randint(0, 256, (N, 3, SIZE, SIZE), generator=gen(0), dtype=torch.uint8)
    noise = torch.randn(N, 3, SIZE, SIZE, generator=gen(1))
    levels = 0.01 * torch.arange(1, N + 1, dtype=torch.float32)[:, None, None, None]  # a different MSE per image
    fakes = (real.float() / 255 + levels * noise).clamp(0, 1)
    flat_codes = torch.tensor(sum(([code] * count for code, count in enumerate(COUNTS)), []))
    codes = flat_codes[torch.randperm(len(flat_codes), generator=gen(2))].reshape(N, 2, 2)
    quant_errors = torch.rand(N, generator=gen(3)) + torch.arange(N)  # varies across batches
    return real, fakes, codes, quant_errors


@pytest.fixture(scope="module")
def evaluation():
    real, fakes, codes, quant_errors = scripted_split()
    result = evaluate_split(Scripted(fakes, codes, quant_errors), real, K, batch_size=4, ssim=True)  # 4 + 4 + 2
    return result, real.float() / 255, fakes, codes, quant_errors


def test_mse_and_psnr_are_means_over_images_of_the_per_image_figures(evaluation):
    result, real, fakes, _, _ = evaluation
    per_image = [float(((f.double() - r.double()) ** 2).sum()) / f.numel() for f, r in zip(fakes, real)]
    assert max(per_image) > 5 * min(per_image)  # so a mean of PSNRs differs from the PSNR of the mean MSE
    assert result.metrics["mse"] == pytest.approx(sum(per_image) / N, rel=1e-6)
    expected_psnr = sum(10 * math.log10(1 / m) for m in per_image) / N
    assert result.metrics["psnr"] == pytest.approx(expected_psnr, rel=1e-6)
    assert abs(result.metrics["psnr"] - 10 * math.log10(N / sum(per_image))) > 0.1


def test_mse_and_psnr_equal_torchmetrics(evaluation):
    from torchmetrics.functional import mean_squared_error
    from torchmetrics.functional.image import peak_signal_noise_ratio

    result, real, fakes, _, _ = evaluation
    assert result.metrics["mse"] == pytest.approx(float(mean_squared_error(fakes, real)), rel=1e-5)
    psnr = peak_signal_noise_ratio(fakes, real, data_range=1.0, dim=(1, 2, 3), reduction="elementwise_mean")
    assert result.metrics["psnr"] == pytest.approx(float(psnr), rel=1e-5)


def test_ssim_equals_torchmetrics_on_images_that_differ(evaluation):
    from torchmetrics.functional.image import structural_similarity_index_measure

    result, real, fakes, _, _ = evaluation
    expected = float(structural_similarity_index_measure(fakes, real, data_range=1.0))
    assert 0.2 < expected < 0.99
    assert result.metrics["ssim"] == pytest.approx(expected, rel=1e-5)


def test_codebook_statistics_of_a_known_histogram(evaluation):
    result, _, _, codes, _ = evaluation
    assert result.histogram.tolist() == COUNTS
    assert result.metrics["perplexity"] == pytest.approx(PERPLEXITY, rel=1e-12)
    assert result.metrics["usage"] == 4 / 8 and result.metrics["dead_codes"] == 4


def test_quant_error_is_the_mean_over_images_whatever_the_batching(evaluation):
    result, _, _, _, quant_errors = evaluation
    assert result.metrics["quant_error"] == pytest.approx(float(quant_errors.double().mean()), rel=1e-6)


@pytest.mark.parametrize("counts, perplexity, used", [
    ([7, 0, 0, 0], 1.0, 1),  # one code: entropy 0
    ([1, 1, 1, 1, 0, 0], 4.0, 4),  # uniform over the used codes, each hit once
    ([3, 1], math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))), 2),
    ([2, 1, 1, 0, 0, 0, 0, 0, 0, 0], 2 ** 1.5, 3),  # p = (1/2, 1/4, 1/4): entropy 1.5 ln 2
])
def test_codebook_stats_closed_forms(counts, perplexity, used):
    stats = codebook_stats(torch.tensor(counts))
    assert stats["perplexity"] == pytest.approx(perplexity, rel=1e-12)
    assert stats["usage"] == used / len(counts)
    assert stats["dead_codes"] == len(counts) - used


def test_batch_perplexity_is_that_of_the_batch_histogram():
    indices = torch.tensor([[0, 0], [1, 2]])  # p = (1/2, 1/4, 1/4)
    assert mean_batch_perplexity(indices, 5) == pytest.approx(2 ** 1.5, rel=1e-12)


# --- KID -----------------------------------------------------------------------------------------------------------

def features(seed, n=24, d=16, shift=0.0):
    return torch.randn(n, d, generator=gen(seed)) + shift


def unbiased_mmd2_cubic(x, y):
    """KID (Binkowski et al. 2018): the unbiased MMD^2 estimate with k(a, b) = (a.b / d + 1)^3."""
    x, y = x.double(), y.double()
    m, d = len(x), x.shape[1]
    k = lambda a, b: (a @ b.t() / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    off = lambda g: g.sum() - g.diagonal().sum()  # noqa: E731
    return float(off(kxx) / (m * (m - 1)) + off(kyy) / (m * (m - 1)) - 2 * kxy.sum() / m**2)


def test_kid_over_full_subsets_is_the_unbiased_mmd_with_the_cubic_kernel():
    a, b = features(0), features(1, shift=0.3)
    expected = unbiased_mmd2_cubic(a, b)
    assert expected > 0.01
    mean, std = kernel_inception_distance(a, b, subset_size=len(a), subsets=3)  # every subset: all of each set
    assert mean == pytest.approx(expected, rel=1e-5)
    assert std == pytest.approx(0.0, abs=1e-6 * expected)


def test_kid_equals_torch_fidelitys_at_its_defaults_on_the_same_features():
    """Subsets of 10 of 24 features, drawn by torch-fidelity's seeded RNG: our default subset count and seed are
    torch-fidelity's, and each subset's value is the unbiased MMD^2 above."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    a, b = features(2), features(3, shift=0.2)
    reference = kid_features_to_metric(a, b, kid_subset_size=10, verbose=False)  # torch-fidelity's defaults
    mean, std = kernel_inception_distance(a, b, subset_size=10)
    assert mean == pytest.approx(reference[KEY_METRIC_KID_MEAN], rel=1e-6)
    assert std == pytest.approx(reference[KEY_METRIC_KID_STD], rel=1e-6)
    # the subsets are torch-fidelity's documented draw: RandomState(2020), a then b, without replacement
    rng = np.random.RandomState(2020)
    values = []
    for _ in range(100):
        ia, ib = rng.choice(24, 10, replace=False), rng.choice(24, 10, replace=False)
        values.append(unbiased_mmd2_cubic(a[torch.from_numpy(ia)], b[torch.from_numpy(ib)]))
    assert mean == pytest.approx(float(np.mean(values)), rel=1e-5)
