import math

import torch
from torch import nn

from bench.metrics import codebook_stats, evaluate_split, mean_batch_perplexity
from methods.base import QuantizerOutput


def test_codebook_stats_match_closed_form_for_known_histogram():
    histogram = torch.tensor([6, 2, 0, 0, 0, 0, 0, 0])  # p = (3/4, 1/4)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    stats = codebook_stats(histogram)
    assert math.isclose(stats["perplexity"], math.exp(entropy), rel_tol=1e-12)
    assert stats["usage"] == 2 / 8
    assert stats["dead_codes"] == 6


def test_uniform_histogram_has_perplexity_equal_to_codes_used():
    stats = codebook_stats(torch.tensor([5, 5, 5, 5, 0]))
    assert math.isclose(stats["perplexity"], 4.0, rel_tol=1e-12)
    assert stats["usage"] == 4 / 5


class FixedCodes(nn.Module):
    """A model whose quantizer emits code b % 4 for every position of the b-th image: reconstruction is exact."""

    def __init__(self):
        super().__init__()
        self.quantizer = type("Q", (), {"codebook_size": 8})()

    @staticmethod
    def preprocess(images):
        return images.float() / 127.5 - 1

    @staticmethod
    def postprocess(x):
        return (x + 1) / 2

    def forward(self, x):
        codes = x[:, 1, 0, 0].add(1).mul(127.5).round().long() % 4
        indices = codes[:, None, None].expand(-1, 2, 2)
        zero = x.new_zeros(())
        return x, QuantizerOutput(x, indices, zero, zero)


def test_split_perplexity_comes_from_one_histogram_not_batch_averages():
    images = torch.zeros(8, 3, 4, 4, dtype=torch.uint8)
    images[:, 1, 0, 0] = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1], dtype=torch.uint8)  # batch 1: code 0, batch 2: code 1
    result = evaluate_split(FixedCodes(), images, codebook_size=8, batch_size=4)
    per_batch = [mean_batch_perplexity(torch.full((4, 2, 2), c), 8) for c in (0, 1)]
    assert sum(per_batch) / 2 == 1.0  # each batch alone uses a single code
    assert math.isclose(result.metrics["perplexity"], 2.0, rel_tol=1e-12)  # the split uses two, equally
    assert result.metrics["usage"] == 2 / 8
    assert result.histogram.tolist() == [16, 16, 0, 0, 0, 0, 0, 0]
    assert result.metrics["mse"] < 1e-12  # the identity model reconstructs exactly (up to rounding)
