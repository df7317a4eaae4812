"""The tokenizer-paper methods of issue 16 (fc, bsq, ibq, rvq), each against its defining formula written out here
independently of the adapters (their helpers are never called for an expected value); rvq's D codes per position
through the codebook statistics, the stage-2 prior and the report."""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench.datasets import ImageSplits
from bench.metrics import code_histogram, codebook_stats, evaluate_split
from bench.models import build_model
from bench.prior import CodePrior, PriorConfig, run_stage2
from bench.report import build_report
from bench.report.figures import code_frequency_figure
from bench.report.runs import load, prepare
from bench.report.tables import levels_table
from bench.run import main
from bench.spec import RunSpec
from methods import create_method, method_options
from methods.ema import PLAIN_EMA_VQ
from tests.conftest import TINY
from tests.formulas import D, K, feature_map, gen, map_of, nearest, rows_of


# The methods whose defining update this file tests (read by test_definitions_methods.py's completeness check).
DEFINED = {"fc", "bsq", "ibq", "rvq"}

pytestmark = pytest.mark.usefixtures("one_thread")


def unit(x):
    return x / x.pow(2).sum(-1, keepdim=True).sqrt()


def randomize_(module, seed):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen(seed), dtype=torch.float64).to(p.dtype))
            seed += 1


# --- fc: factorized, l2-normalized codes (ViT-VQGAN, LlamaGen) ------------------------------------------------------

def test_fc_defaults_are_llamagens():
    assert method_options("fc") == {"code_dim": 8, "codebook_weight": 1.0, "commitment_weight": 0.25}
    q = create_method("fc", dim=D, codebook_size=K)
    assert q.codebook.weight.shape == (K, 8) and q.project_in.in_features == D and q.project_out.out_features == D
    torch.testing.assert_close(q.codebook.weight.norm(dim=1), torch.ones(K))  # initialized on the sphere


def test_fc_searches_by_cosine_in_the_projected_space_with_vq_vae_losses_and_straight_through():
    """x = W_in z + b, normalized; c = C_k / |C_k| with k = argmin |x - c|; decoder input W_out c + b_out;
    aux = 1 |c - sg x|^2 + 0.25 |x - sg c|^2; the decoder's gradient reaches x unchanged."""
    torch.manual_seed(0)
    q = create_method("fc", dim=D, codebook_size=K, code_dim=3).double().train()
    randomize_(q, seed=10)
    z = feature_map(seed=2).requires_grad_()
    upstream = feature_map(seed=3)
    out = q(z)
    loss = (out.quantized * upstream).sum() + out.aux_loss
    grad_z, grad_codebook = torch.autograd.grad(loss, [z, q.codebook.weight])

    w_in, b_in = q.project_in.weight.detach(), q.project_in.bias.detach()
    w_out, b_out = q.project_out.weight.detach(), q.project_out.bias.detach()
    raw = q.codebook.weight.detach().clone().requires_grad_()
    y = rows_of(z) @ w_in.t() + b_in  # (N, 3), differentiable in z
    x = unit(y)
    codes = unit(raw)  # (K, 3), differentiable in the raw codebook
    k = nearest(x.detach(), codes.detach())  # on the sphere: nearest = largest cosine similarity
    c = codes.detach()[k]
    n = c.numel()
    expected_aux = ((c - x.detach()) ** 2).mean() + 0.25 * ((x.detach() - c) ** 2).mean()
    assert torch.equal(out.indices.reshape(-1), k)
    torch.testing.assert_close(out.quantized, map_of(c @ w_out.t() + b_out, z), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.aux_loss, expected_aux, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.quant_error, ((x.detach() - c) ** 2).mean(), rtol=1e-12, atol=0)
    # dL/dx: the decoder's gradient straight through the search, plus the commitment term's
    grad_x = rows_of(upstream) @ w_out + 0.25 * 2 * (x.detach() - c) / n
    expected_z = torch.autograd.grad(x, z, grad_outputs=grad_x)[0]  # back through the normalization and W_in
    # dL/dc_j: the codebook term only, summed over the positions that chose j, back through the normalization
    grad_codes = torch.zeros_like(codes).index_add_(0, k, 2 * (c - x.detach()) / n)
    expected_codebook = torch.autograd.grad(codes, raw, grad_outputs=grad_codes)[0]
    torch.testing.assert_close(grad_z, expected_z, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_codebook, expected_codebook, rtol=1e-10, atol=1e-12)


def test_fc_decodes_and_exports_unit_codes_projected_up():
    q = create_method("fc", dim=D, codebook_size=K).double().eval()
    randomize_(q, seed=4)
    with torch.no_grad():
        exported = q.export_codebook()
        expected = unit(q.codebook.weight) @ q.project_out.weight.t() + q.project_out.bias
    torch.testing.assert_close(exported, expected, rtol=1e-12, atol=1e-12)


# --- bsq: binary spherical quantization ------------------------------------------------------------------------

def test_bsq_defaults_are_the_authors_and_the_projection_is_always_there():
    assert method_options("bsq") == {"entropy_weight": 0.1, "diversity_gamma": 1.0, "commitment_weight": 0.0,
                                     "inv_temperature": 1.0}
    q = create_method("bsq", dim=4, codebook_size=16)  # D == L: the library would drop its projections
    assert isinstance(q.lfq.project_in, torch.nn.Linear) and isinstance(q.lfq.project_out, torch.nn.Linear)
    assert q.lfq.spherical and q.lfq.codebook_scale == 1.0
    with pytest.raises(ValueError, match="power of two"):
        create_method("bsq", dim=D, codebook_size=24)


def bsq_expectation(q, z, inv_temperature):
    """The paper's definition written out: v = (W z + b) / |W z + b|, q = sign(v) / sqrt(L), the index the bits
    read most significant first, the decoder input W_out q + b_out; the per-sample entropy through the
    factorization over bits (p(bit_d = 1) = sigmoid(4 tau v_d / sqrt(L)): p(c|v) is a product of independent bits)
    and the codebook entropy over the 2^L codes enumerated one by one."""
    bits = q.bits
    w_in, b_in = q.lfq.project_in.weight.detach().double(), q.lfq.project_in.bias.detach().double()
    w_out, b_out = q.lfq.project_out.weight.detach().double(), q.lfq.project_out.bias.detach().double()
    v = unit(rows_of(z.double()) @ w_in.t() + b_in)  # (N, L)
    code = torch.where(v > 0, 1.0, -1.0).double() / math.sqrt(bits)
    index = ((v > 0).long() * (2 ** torch.arange(bits - 1, -1, -1))).sum(1)
    p1 = torch.sigmoid(4 * inv_temperature * v / math.sqrt(bits))
    sample_entropy = (-(p1 * p1.log() + (1 - p1) * (1 - p1).log())).sum(1).mean()
    every = torch.tensor(list(itertools.product([1.0, -1.0], repeat=bits)), dtype=torch.float64) / math.sqrt(bits)
    p = torch.softmax(2 * inv_temperature * v @ every.t(), dim=1)  # (N, 2^L)
    mean_p = p.mean(0)
    codebook_entropy = -(mean_p * mean_p.log()).sum()
    return v, code, index, code @ w_out.t() + b_out, sample_entropy, codebook_entropy


@pytest.mark.parametrize("inv_temperature", [1.0, 3.0])
def test_bsq_quantizes_signs_on_the_sphere_with_the_papers_entropy_terms(inv_temperature):
    torch.manual_seed(0)
    q = create_method("bsq", dim=D, codebook_size=K, inv_temperature=inv_temperature).train()
    z = feature_map(seed=5, dtype=torch.float32)
    out = q(z)
    v, code, index, decoded, sample_h, codebook_h = bsq_expectation(q, z, inv_temperature)
    assert torch.equal(out.indices.reshape(-1), index)
    torch.testing.assert_close(rows_of(out.quantized).double(), decoded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.diagnostics["per_sample_entropy"].double(), sample_h, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.diagnostics["batch_entropy"].double(), codebook_h, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.aux_loss.double(), 0.1 * (sample_h - codebook_h), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.quant_error.double(), ((v - code) ** 2).mean(), rtol=1e-5, atol=1e-6)


def test_bsq_commitment_is_the_authors_per_position_sum_and_the_gradient_is_straight_through():
    torch.manual_seed(0)
    q = create_method("bsq", dim=D, codebook_size=K, entropy_weight=0.0, commitment_weight=0.5).train()
    z = feature_map(seed=6, dtype=torch.float32).requires_grad_()
    upstream = feature_map(seed=7, dtype=torch.float32)
    out = q(z)
    v, code, *_ = bsq_expectation(q, z.detach(), 1.0)
    torch.testing.assert_close(out.aux_loss.double(), 0.5 * ((v - code) ** 2).sum(1).mean(), rtol=1e-5, atol=1e-6)
    grad_z = torch.autograd.grad((out.quantized * upstream).sum(), z)[0]
    # straight through: the decoder's gradient, back through W_out, reaches the normalized v unchanged
    w_in, b_in = q.lfq.project_in.weight.detach(), q.lfq.project_in.bias.detach()
    z2 = z.detach().clone().requires_grad_()
    v2 = unit(rows_of(z2) @ w_in.t() + b_in)
    expected = torch.autograd.grad(v2, z2, grad_outputs=rows_of(upstream) @ q.lfq.project_out.weight.detach())[0]
    torch.testing.assert_close(grad_z, expected, rtol=1e-5, atol=1e-6)


# --- ibq: index backpropagation quantization ---------------------------------------------------------------------

def test_ibq_defaults_are_the_authors_configs():
    assert method_options("ibq") == {"st_commitment_weight": 1.0, "commitment_weight": 1.0, "codebook_weight": 0.25,
                                     "entropy_weight": 0.05, "entropy_temperature": 0.01,
                                     "sample_entropy_weight": 1.0, "batch_entropy_weight": 1.0}


def ibq_gradients(x, codebook, grad_out):
    """The straight-through estimator over the softmax, by hand. z_q = (h - sg s + s) C, s = softmax(x C^T):
    for an upstream gradient G on z_q, dC = h^T G + dl^T x and dx = dl C, with a = G C^T and
    dl = s * (a - sum_k s_k a_k) the softmax's Jacobian applied to a."""
    logits = x @ codebook.t()
    s = torch.softmax(logits, dim=1)
    hard = F.one_hot(logits.argmax(1), codebook.shape[0]).double()
    a = grad_out @ codebook.t()
    dl = s * (a - (s * a).sum(1, keepdim=True))
    return hard.t() @ grad_out + dl.t() @ x, dl @ codebook


def test_ibq_decoder_sees_the_argmax_code_and_every_code_receives_gradient():
    q = create_method("ibq", dim=D, codebook_size=K, st_commitment_weight=0.0, commitment_weight=0.0,
                      codebook_weight=0.0, entropy_weight=0.0).double().train()
    z = feature_map(seed=8).requires_grad_()
    upstream = feature_map(seed=9)
    out = q(z)
    x, codebook = rows_of(z.detach()), q.codebook.weight.detach()
    k = (x @ codebook.t()).argmax(1)  # the largest dot product, not the nearest code
    assert torch.equal(out.indices.reshape(-1), k)
    torch.testing.assert_close(out.quantized, map_of(codebook[k], z), rtol=0, atol=0)
    grad_z, grad_codebook = torch.autograd.grad((out.quantized * upstream).sum(), [z, q.codebook.weight])
    expected_codebook, expected_x = ibq_gradients(x, codebook, rows_of(upstream))
    torch.testing.assert_close(grad_codebook, expected_codebook, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rows_of(grad_z), expected_x, rtol=1e-10, atol=1e-12)
    assert (grad_codebook.abs().sum(1) > 0).all()  # all K codes, used or not
    assert len(k.unique()) < K


def test_ibq_double_quantization_loss_value_and_gradients():
    """w1 |z_q - z|^2 (z_q the straight-through code) + w2 |sg(C_k) - z|^2 + w3 |C_k - sg(z)|^2, weights apart."""
    w1, w2, w3 = 0.7, 0.4, 0.25
    q = create_method("ibq", dim=D, codebook_size=K, st_commitment_weight=w1, commitment_weight=w2,
                      codebook_weight=w3, entropy_weight=0.0).double().train()
    z = feature_map(seed=11, scale=0.5).requires_grad_()
    out = q(z)
    x, codebook = rows_of(z.detach()), q.codebook.weight.detach()
    k = (x @ codebook.t()).argmax(1)
    c = codebook[k]
    n = c.numel()
    torch.testing.assert_close(out.aux_loss, (w1 + w2 + w3) * ((c - x) ** 2).mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(out.quant_error, ((c - x) ** 2).mean(), rtol=1e-12, atol=0)
    grad_z, grad_codebook = torch.autograd.grad(out.aux_loss, [z, q.codebook.weight])
    g = w1 * 2 * (c - x) / n  # the first term's gradient on z_q, which goes back through the estimator
    via_codebook, via_x = ibq_gradients(x, codebook, g)
    expected_x = via_x - (w1 + w2) * 2 * (c - x) / n
    expected_codebook = via_codebook + torch.zeros_like(codebook).index_add_(0, k, w3 * 2 * (c - x) / n)
    torch.testing.assert_close(rows_of(grad_z), expected_x, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_codebook, expected_codebook, rtol=1e-10, atol=1e-12)


def test_ibq_entropy_term_is_sample_entropy_minus_batch_entropy_at_its_temperature():
    q = create_method("ibq", dim=D, codebook_size=K, st_commitment_weight=0.0, commitment_weight=0.0,
                      codebook_weight=0.0, entropy_weight=0.3, entropy_temperature=2.0,
                      sample_entropy_weight=1.5, batch_entropy_weight=0.5).double().train()
    z = feature_map(seed=12)
    out = q(z)
    logits = (rows_of(z) @ q.codebook.weight.detach().t()) / 2.0
    p = logits.exp() / logits.exp().sum(1, keepdim=True)
    sample_h = -(p * p.log()).sum(1).mean()
    mean_p = p.mean(0)
    batch_h = -(mean_p * (mean_p + 1e-5).log()).sum()  # the authors' epsilon inside the log
    torch.testing.assert_close(out.aux_loss, 0.3 * (1.5 * sample_h - 0.5 * batch_h), rtol=1e-10, atol=1e-12)


# --- rvq: residual VQ, D codes per position --------------------------------------------------------------------

def set_codebooks_(q, codebooks):
    with torch.no_grad():
        for layer, codebook in zip(q.rvq.layers, codebooks):
            layer._codebook.embed.copy_(codebook[None])


def scaled_codebooks(depth, seed=20, ratio=0.1):
    """Level i's codes N(0, 1) * ratio^i: coarse to fine."""
    return [torch.randn(K, D, generator=gen(seed + i)) * ratio ** i for i in range(depth)]


def test_rvq_names_its_library_flags():
    assert method_options("rvq") == {"depth": 4, "decay": 0.99, "commitment_weight": 0.25}
    q = create_method("rvq", dim=D, codebook_size=K)
    assert q.code_depth == 4 and len(q.rvq.layers) == 4 and q.codebook_size == K
    assert not q.rvq.shared_codebook and not q.rvq.quantize_dropout and q.rvq.beam_size is None
    assert not q.rvq.implicit_neural_codebook and not q.rvq.has_projections and q.rvq.quant_grad_frac == 0
    for layer in q.rvq.layers:
        assert layer.ema_update and not layer.learnable_codebook and not layer.rotation_trick
        assert layer._codebook.decay == 0.99 and layer.commitment_weight == 0.25
        assert bool(layer._codebook.initted) and layer._codebook.threshold_ema_dead_code == 0  # no k-means init
    assert list(q.parameters()) == []  # EMA codebooks: nothing for an optimizer


def test_rvq_level_i_quantizes_the_residual_of_the_levels_before_it():
    q = create_method("rvq", dim=D, codebook_size=K, depth=3).eval()
    codebooks = scaled_codebooks(3, ratio=0.5)
    set_codebooks_(q, codebooks)
    z = feature_map(seed=21, dtype=torch.float32)
    with torch.no_grad():
        out = q(z)
    residual, total, expected = rows_of(z), torch.zeros(2 * 4 * 4, D), []
    for codebook in codebooks:  # the recursion written out: nearest code to what the levels before left
        k = nearest(residual, codebook)
        expected.append(k)
        total, residual = total + codebook[k], residual - codebook[k]
    assert out.indices.shape == (2, 4, 4, 3)
    assert torch.equal(out.indices.reshape(-1, 3), torch.stack(expected, dim=1))
    torch.testing.assert_close(out.quantized, map_of(total, z), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.quant_error, ((rows_of(z) - total) ** 2).mean(), rtol=1e-5, atol=1e-7)


def test_rvq_recovers_a_sum_of_one_code_per_level():
    """z made of one code of each level (coarse to fine): the levels find exactly those codes, and the sum of the
    chosen codes is z, where one level alone leaves the finer levels' part."""
    depth = 4
    q = create_method("rvq", dim=D, codebook_size=K, depth=depth).eval()
    codebooks = scaled_codebooks(depth)
    set_codebooks_(q, codebooks)
    chosen = torch.randint(0, K, (2, 4, 4, depth), generator=gen(22))
    z = sum(codebooks[i][chosen[..., i]] for i in range(depth)).permute(0, 3, 1, 2)  # (B, D, H, W)
    with torch.no_grad():
        out = q(z)
        decoded = q.decode_indices(chosen)
    assert torch.equal(out.indices, chosen)
    torch.testing.assert_close(out.quantized, z, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(decoded, z, rtol=1e-5, atol=1e-6)  # decode_indices: the sum over the levels
    coarse_only = codebooks[0][chosen[..., 0]].permute(0, 3, 1, 2)
    assert float(out.quant_error) < 1e-10 < float(((z - coarse_only) ** 2).mean())


def test_rvq_training_forward_one_straight_through_and_the_mean_commitment_of_the_levels():
    depth = 3
    q = create_method("rvq", dim=D, codebook_size=K, depth=depth, commitment_weight=0.4).train()
    codebooks = scaled_codebooks(depth, ratio=0.5)
    set_codebooks_(q, codebooks)
    z = feature_map(seed=23, dtype=torch.float32).requires_grad_()
    upstream = feature_map(seed=24, dtype=torch.float32)
    out = q(z)  # also moves the codebooks by EMA (after the search and the losses)
    residual, terms, grad_aux = rows_of(z.detach()), [], torch.zeros(2 * 4 * 4, D)
    n = residual.numel()
    for codebook in codebooks:
        c = codebook[nearest(residual, codebook)]
        terms.append(((residual - c) ** 2).mean())
        grad_aux += 0.4 / depth * 2 * (residual - c) / n  # residual_i = z - (codes before): identity Jacobian
        residual = residual - c
    torch.testing.assert_close(out.aux_loss, 0.4 * sum(terms) / depth, rtol=1e-5, atol=1e-7)
    grad_decoder = torch.autograd.grad((out.quantized * upstream).sum(), z, retain_graph=True)[0]
    torch.testing.assert_close(grad_decoder, upstream, rtol=0, atol=0)  # once, not depth times
    grad_z = torch.autograd.grad(out.aux_loss, z)[0]
    torch.testing.assert_close(rows_of(grad_z), grad_aux, rtol=1e-5, atol=1e-8)
    assert not torch.allclose(q.export_codebook()[0], codebooks[0])  # the EMA update happened


def test_rvq_of_depth_one_is_ema():
    torch.manual_seed(3)
    rvq = create_method("rvq", dim=D, codebook_size=K, depth=1).train()
    torch.manual_seed(3)
    ema = create_method("ema", dim=D, codebook_size=K).train()
    torch.testing.assert_close(rvq.export_codebook()[0], ema.export_codebook(), rtol=0, atol=0)
    for seed in (25, 26):
        z = feature_map(seed=seed, dtype=torch.float32)
        a, b = rvq(z), ema(z)
        assert torch.equal(a.indices[..., 0], b.indices)
        torch.testing.assert_close(a.quantized, b.quantized, rtol=0, atol=1e-6)  # x + (q - x) rounds apart
        torch.testing.assert_close(a.aux_loss, b.aux_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(rvq.export_codebook()[0], ema.export_codebook(), rtol=1e-6, atol=1e-7)
    assert PLAIN_EMA_VQ["decay"] == 0.99


# --- D codes per position: statistics, prior, harness, report ---------------------------------------------------

def test_code_histogram_counts_each_level_apart():
    indices = torch.randint(0, 5, (3, 2, 2, 4), generator=gen(30))
    histogram = code_histogram(indices, 5)
    expected = torch.zeros(4, 5, dtype=torch.int64)
    for b, h, w, level in itertools.product(range(3), range(2), range(2), range(4)):
        expected[level, indices[b, h, w, level]] += 1
    assert torch.equal(histogram, expected)
    assert torch.equal(code_histogram(indices[..., 0], 5), expected[0])  # one code per position: (K,)


def test_codebook_stats_of_several_levels_are_overall_and_per_level():
    histogram = torch.tensor([[6, 2, 0, 0], [2, 2, 2, 2], [8, 0, 0, 0]])
    stats = codebook_stats(histogram)
    for i, row in enumerate(histogram.tolist()):
        p = [c / sum(row) for c in row if c]
        assert stats[f"perplexity_level_{i}"] == pytest.approx(math.exp(-sum(x * math.log(x) for x in p)))
        assert stats[f"usage_level_{i}"] == sum(1 for c in row if c) / 4
        assert stats[f"dead_codes_level_{i}"] == sum(1 for c in row if not c)
    flat = [c / 24 for row in histogram.tolist() for c in row if c]  # the 12 (level, code) vectors as one codebook
    assert stats["perplexity"] == pytest.approx(math.exp(-sum(x * math.log(x) for x in flat)))
    assert stats["perplexity"] == pytest.approx(3 * math.prod(stats[f"perplexity_level_{i}"] for i in range(3)) ** (1 / 3))
    assert stats["usage"] == 7 / 12 and stats["dead_codes"] == 5
    assert set(codebook_stats(histogram[0])) == {"perplexity", "usage", "dead_codes"}  # one level: as ever


class FixedLevels(torch.nn.Module):
    """A model whose quantizer emits given (B, 2, 2, 2) codes: two codes per position."""

    def __init__(self, codes):
        super().__init__()
        self.codes, self.weight = codes, torch.nn.Parameter(torch.zeros(()))

    def preprocess(self, batch):
        return batch.float()

    def postprocess(self, x):
        return x / 255

    def forward(self, x):
        from methods import QuantizerOutput

        zero = torch.zeros(())
        return x, QuantizerOutput(x, self.codes[: len(x)], zero, zero)


def test_evaluate_split_reports_overall_and_per_level_statistics():
    codes = torch.tensor([[[[0, 1], [0, 1]], [[0, 2], [0, 3]]]] * 4)  # (4, 2, 2, 2)
    images = torch.zeros(4, 3, 4, 4, dtype=torch.uint8)
    result = evaluate_split(FixedLevels(codes), images, codebook_size=4, batch_size=3)
    assert result.histogram.tolist() == [[16, 0, 0, 0], [0, 8, 4, 4]]
    assert result.metrics["perplexity_level_0"] == pytest.approx(1.0)
    assert result.metrics["perplexity_level_1"] == pytest.approx(math.exp(-(0.5 * math.log(0.5) + 0.5 * math.log(0.25))))
    assert result.metrics["usage"] == 4 / 8 and result.metrics["dead_codes"] == 4
    assert result.metrics["usage_level_1"] == 3 / 4


def test_prior_reads_several_codes_per_position_depth_innermost_each_level_its_own_tokens():
    k, grid = 5, (2, 3, 4)
    prior = CodePrior(k, grid, layers=1, heads=2, width=16)
    codes = torch.randint(0, k, (2, *grid), generator=gen(31))
    tokens = prior.inputs(codes.flatten(1))
    for b in range(2):
        sequence = [codes[b, h, w, level].item() + level * k  # raster order, depth innermost, level-offset tokens
                    for h, w, level in itertools.product(range(2), range(3), range(4))]
        assert tokens[b].tolist() == [k * 4] + sequence[:-1]  # the start token is the last of the K*D+1
    assert prior.tok_emb.num_embeddings == k * 4 + 1 and prior.head.out_features == k


def test_cached_sampling_of_several_levels_agrees_with_the_full_forward_pass():
    torch.manual_seed(0)
    prior = CodePrior(K, (2, 3, 3), layers=2, heads=2, width=32).eval()
    greedy = prior.sample(4, top_k=1)  # via the KV cache, each drawn code fed back at its level's offset
    assert greedy.shape == (4, 2, 3, 3) and int(greedy.max()) < K
    with torch.no_grad():
        logits = prior(prior.inputs(greedy.flatten(1)))
    assert torch.equal(logits.argmax(-1), greedy.flatten(1))


def tiny_rvq_model(depth=3):
    torch.manual_seed(0)
    spec = RunSpec(method="rvq", width=16, res_blocks=1, res_width=8, code_dim=8, codebook_size=K,
                   method_options={"depth": depth})
    return build_model(spec)  # 32x32 images -> 8x8 positions of `depth` codes


def test_rvq_through_the_stage2_prior():
    model = tiny_rvq_model(depth=3)
    g = gen(32)
    draw = lambda n: torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)  # noqa: E731
    data = ImageSplits("random", draw(24), draw(8), draw(4))
    config = PriorConfig(layers=1, heads=2, width=16, dropout=0.0, steps=3, batch_size=8, warmup_steps=1, samples=3)
    samples, info = run_stage2(model, data, K, config, "cpu", batch_size=8)
    assert samples.shape == (3, 3, 32, 32) and samples.dtype == torch.uint8
    assert info["prior_grid"] == [8, 8, 3] and "null_reason" not in info
    assert 0 < info["prior_bits_per_code"] < 2 * math.log2(K)


def test_rvq_runs_through_the_harness_with_prior_and_per_level_record(tmp_path):
    out = tmp_path / "results"
    code = main(["--methods", "rvq", "--steps", "2", "--set", "eval_every=0", *TINY, "--codebook-size", "16",
                 "--set", "rvq.depth=2", "--gfid", *[f"--set=prior_options.{option}" for option in (
                     "steps=2", "samples=2", "layers=1", "width=16", "heads=2", "batch_size=8", "warmup_steps=1")],
                 "--out", str(out), "--scratch", str(tmp_path / "runs"), "--quiet"])
    assert code == 0
    (path,) = out.rglob("*.json")
    record = json.loads(path.read_text())
    env, metrics = record["env"], record["metrics"]
    assert env["code_depth"] == 2 and env["codebook_size"] == 16
    histogram = np.asarray(env["code_histogram"])
    assert histogram.shape == (2, 16) and (histogram.sum(1) == env["test_images"] * 64).all()
    for level in range(2):
        row = histogram[level] / histogram[level].sum()
        assert metrics[f"perplexity_level_{level}"] == pytest.approx(math.exp(-(row[row > 0] * np.log(row[row > 0])).sum()))
        assert metrics[f"usage_level_{level}"] == (histogram[level] > 0).mean()
    assert metrics["dead_codes"] == int((histogram == 0).sum())
    assert env["prior"]["prior_grid"] == [8, 8, 2] and metrics["prior_bits_per_code"] is not None
    assert metrics["gfid"] is None and record["null_reasons"]["gfid"]  # FID off in TINY: the samples are not scored


# --- the report --------------------------------------------------------------------------------------------------

def report_record(folder: Path, method: str, seed: int, metrics: dict, histogram, depth: int, **options) -> None:
    from bench.records import write_record

    spec = RunSpec(method=method, seed=seed, experiment="exp", dataset="photos", steps=20, codebook_size=4,
                   method_options=options)
    values = {"mse": 0.05, "psnr": 13.0, "ssim": 0.4, "quant_error": 0.01, "rfid": None, "kid": None, "lpips": None,
              "gfid": None, "prior_bits_per_code": None, **metrics}
    write_record(folder / "exp" / f"{spec.run_id()}.json", {
        "experiment": "exp", "run_id": spec.run_id(), "spec": spec.to_dict(), "metrics": values,
        "cost": {"wall_s": 12.0, "train_s": 10.0, "train_images_per_s": 256.0, "eval_s": 1.0, "resumes": 0,
                 "peak_mem_mb": 300.0, "params_autoencoder": 1000, "params_method": 0, "params_total": 1000},
        "null_reasons": {k: "not measured in this test" for k, v in values.items() if v is None},
        "curves": [{"step": 20, "train_s": 10.0, "mse": 0.05, "perplexity": 2.0, "usage": 0.5}],
        "env": {"packages": {"torch": "0"}, "python": "3.11", "git_commit": None, "device": "cpu",
                "device_name": "test", "cpu_count": 1, "torch_threads": 1, "hostname": "test", "codebook_size": 4,
                "export": {}, "test_images": 2, "code_depth": depth, "code_histogram": histogram},
    })


@pytest.fixture
def level_records(tmp_path):
    ppl = {0: [3.0, 3.4], 1: [2.0, 2.2]}
    for seed in range(2):
        histogram = [[4, 2, 1, 1], [6, 2, 0, 0]]
        stats = codebook_stats(torch.tensor(histogram))
        stats.update({f"perplexity_level_{level}": ppl[level][seed] for level in (0, 1)})
        report_record(tmp_path, "rvq", seed, stats, histogram, depth=2)
        report_record(tmp_path, "ste", seed, codebook_stats(torch.tensor([5, 3, 0, 0])), [5, 3, 0, 0], depth=1)
    return tmp_path, ppl


def test_the_report_tabulates_each_levels_statistics(level_records, tmp_path):
    folder, ppl = level_records
    markdown, files, _ = build_report(folder, tmp_path / "report", figures=True)
    runs = prepare(load(folder)[0])[0]
    table = levels_table(runs)
    assert [row[0] for row in table.rows] == ["rvq"]  # only the method with several codes per position
    assert table.header[:5] == ["method", "seeds", "perplexity L0", "usage L0", "dead codes L0"]
    row = dict(zip(table.header, table.rows[0]))
    for level in (0, 1):
        mean, std = np.mean(ppl[level]), np.std(ppl[level], ddof=1)
        assert row[f"perplexity L{level}"] == f"{mean:.1f} ± {std:.1f}"
    assert row["usage L1"].startswith("0.500") and row["dead codes L1"].startswith("2.0")
    group = tmp_path / "report" / "exp" / "photos"
    assert (group / "levels.md").exists() and (group / "levels.csv").exists()
    assert "codebook statistics per level" in markdown and "K·D codebook vectors" in markdown
    assert (group / "code_frequency.png").exists()


def test_code_frequency_figure_draws_one_line_per_level(level_records):
    folder, _ = level_records
    runs, records = prepare(load(folder)[0])[0], load(folder)[1]
    fig = code_frequency_figure(runs, records)
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert labels[:3] == ["rvq, level 0", "rvq, level 1", "ste"]
    level_1 = fig.axes[0].get_lines()[1].get_ydata()
    np.testing.assert_allclose(level_1, [0.75, 0.25])  # its own K codes, its own frequencies, sorted
