"""Each method's defining update against a formula written out here, independently of the adapter's helpers.

Nothing in this file calls `straight_through_vq`, `nearest_code`, `darts_term`, `jvp_term`, `code_sums` or any
other helper the adapters use to compute what is checked: the expected values are closed forms (losses,
gradients, EMA updates, roundings) computed from the adapter's raw parameters and buffers. Library-backed
adapters also have the library object's behaviour flags asserted, so that no library default decides.
"""
from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bench.models import VQModel, build_model
from bench.spec import RunSpec
from methods import TrainContext, create_method, list_methods, method_options
from tests.formulas import D, K, feature_map, gen, map_of, nearest, rows_of


# The methods whose defining update this file tests. Another test file that tests a method's definition declares
# it the same way, with a module-level DEFINED set of literal names.
DEFINED = {"ste", "ste-ln", "ema", "cosine", "rotation", "fsq", "lfq", "simvq", "cvq", "affine", "gumbel", "mq",
           "mq-alt"}


def declared_definitions() -> dict[str, str]:
    """method -> the test file declaring its definition test, from every tests/test_*.py's module-level DEFINED."""
    declared = {}
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "DEFINED" for t in node.targets):
                declared.update(dict.fromkeys(ast.literal_eval(node.value), path.name))
    return declared


def test_every_registered_method_has_a_definition_test():
    registered = {m for m in list_methods() if not m.startswith("test-")}
    missing = sorted(registered - set(declared_definitions()))
    assert not missing, (f"no definition test for {missing}: test each one's defining update against a formula "
                         f"written in the test, and name it in that test file's module-level DEFINED set")


# --- independent building blocks ----------------------------------------------------------------------------------

def scatter_rows(values, index, k):
    """sum of the rows of `values` per index: (N, D), (N,) -> (k, D)."""
    out = torch.zeros(k, values.shape[1], dtype=values.dtype)
    for i, j in enumerate(index.tolist()):
        out[j] += values[i]
    return out


def vq_expectation(y, codebook, upstream_rows, codebook_weight, commitment_weight):
    """VQ-VAE (van den Oord et al. 2017) for the search input rows y (N, D) and a codebook (K, D):
    the chosen codes, aux = cb |e - sg(y)|^2 + cm |y - sg(e)|^2 (means over N*D), and the gradients of
    sum(quantized * upstream) + aux: to y, the upstream copied (straight through) plus cm * 2 (y - e) / (N D);
    to the codebook, cb * 2 (e - y) / (N D) summed into each chosen code (the decoder path sends it nothing)."""
    y, codebook = y.detach(), codebook.detach()
    k = nearest(y, codebook)
    e = codebook[k]
    n = y.numel()
    aux = codebook_weight * ((e - y) ** 2).sum() / n + commitment_weight * ((y - e) ** 2).sum() / n
    grad_y = upstream_rows + commitment_weight * 2 * (y - e) / n
    grad_codebook = scatter_rows(codebook_weight * 2 * (e - y) / n, k, codebook.shape[0])
    return k, e, aux, grad_y, grad_codebook


def channel_layernorm(z, norm):
    """MQ's and ste-ln's pre-search map written out: LayerNorm over the channels of each position (after the
    encoder's own 1x1 projection to the code dimension, the MQ authors' quant_conv then trailing_norm)."""
    rows = rows_of(z)
    mean = rows.mean(1, keepdim=True)
    var = ((rows - mean) ** 2).mean(1, keepdim=True)
    return (rows - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias  # (N, D)


def randomize_(module, seed):
    with torch.no_grad():
        for i, p in enumerate(module.parameters()):
            p.copy_(torch.randn(p.shape, generator=gen(seed + i), dtype=torch.float64).to(p.dtype) * 0.5)


# --- ste, ste-ln: VQ-VAE ------------------------------------------------------------------------------------------

def test_ste_defaults_are_vq_vaes_weights():
    for name in ("ste", "ste-ln", "rotation", "simvq", "cvq", "affine"):
        options = method_options(name)
        assert (options["codebook_weight"], options["commitment_weight"]) == (1.0, 0.25), name


@pytest.mark.parametrize("name", ["ste", "ste-ln"])
def test_ste_loss_value_and_gradients_are_vq_vaes(name):
    """Defaults (codebook 1, commitment 0.25): the two terms have the same value, so only their gradients tell
    them apart; a swap of the two weights changes the gradient reaching z and the codebook by 4x."""
    q = create_method(name, dim=D, codebook_size=K).double().train()
    with torch.no_grad():
        q.codebook.weight.copy_(torch.randn(K, D, generator=gen(1), dtype=torch.float64))
    if name == "ste-ln":
        randomize_(q.pre, seed=10)
    z = feature_map(seed=2).requires_grad_()
    upstream = feature_map(seed=3)

    out = q(z)
    loss = (out.quantized * upstream).sum() + out.aux_loss
    grad_z, grad_codebook = torch.autograd.grad(loss, [z, q.codebook.weight])

    y = channel_layernorm(z, q.pre.norm) if name == "ste-ln" else rows_of(z)
    k, e, aux, grad_y, expected_codebook = vq_expectation(y, q.codebook.weight, rows_of(upstream), 1.0, 0.25)
    expected_z = torch.autograd.grad(y, z, grad_outputs=grad_y)[0]  # back through the written-out pre-search map

    assert torch.equal(out.indices.reshape(-1), k)
    torch.testing.assert_close(out.quantized, map_of(e, z), rtol=1e-12, atol=1e-12)  # the decoder sees e
    torch.testing.assert_close(out.aux_loss, aux, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.quant_error, ((y.detach() - e) ** 2).mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(grad_z, expected_z, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_codebook, expected_codebook, rtol=1e-10, atol=1e-12)


def test_ste_weights_reach_their_own_terms():
    q = create_method("ste", dim=D, codebook_size=K, codebook_weight=0.7, commitment_weight=0.3).double().train()
    z = feature_map(seed=4).requires_grad_()
    out = q(z)
    grad_z, grad_codebook = torch.autograd.grad(out.aux_loss, [z, q.codebook.weight])
    _, _, _, grad_y, expected_codebook = vq_expectation(rows_of(z), q.codebook.weight, 0.0, 0.7, 0.3)
    torch.testing.assert_close(rows_of(grad_z), grad_y, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(grad_codebook, expected_codebook, rtol=1e-10, atol=1e-14)


# --- ema, cosine: exponential moving averages on vector-quantize-pytorch -------------------------------------

def assert_library_flags(vq, **expected):
    codebook = vq._codebook
    actual = {
        "rotation_trick": vq.rotation_trick, "straight_through": codebook.gumbel_sample.keywords["straight_through"],
        "stochastic": codebook.gumbel_sample.keywords["stochastic"], "directional_reparam": vq.directional_reparam,
        "decay": codebook.decay, "eps": codebook.eps, "commitment_weight": vq.commitment_weight,
        "ema_update": codebook.ema_update, "manual_ema_update": codebook.manual_ema_update,
        "learnable_codebook": vq.learnable_codebook, "use_cosine_sim": vq.use_cosine_sim,
        "kmeans_init": not bool(codebook.initted), "threshold_ema_dead_code": codebook.threshold_ema_dead_code,
        "orthogonal_reg": vq.has_codebook_orthogonal_loss, "diversity_loss": vq.has_codebook_diversity_loss,
        "affine_param": codebook.affine_param, "sync_update_v": vq.sync_update_v,
        "cross_entropy_commitment": vq.commitment_use_cross_entropy_loss, "freeze_codebook": vq.freeze_codebook,
        "route_gradients_to_input": vq.route_gradients_to_input, "has_projections": vq.has_projections,
        "heads": vq.heads, "sample_codebook_temp": codebook.sample_codebook_temp,
    }
    baseline = {
        "rotation_trick": False, "straight_through": False, "stochastic": False, "directional_reparam": False,
        "decay": 0.99, "eps": 1e-5, "commitment_weight": 0.25, "ema_update": True, "manual_ema_update": False,
        "learnable_codebook": False, "use_cosine_sim": False, "kmeans_init": False, "threshold_ema_dead_code": 0,
        "orthogonal_reg": False, "diversity_loss": False, "affine_param": False, "sync_update_v": 0.0,
        "cross_entropy_commitment": False, "freeze_codebook": False, "route_gradients_to_input": True,
        "has_projections": False, "heads": 1, "sample_codebook_temp": 1.0,
    }
    assert actual == {**baseline, **expected}


def test_library_vq_adapters_name_every_behaviour_flag():
    assert_library_flags(create_method("ema", dim=D, codebook_size=K).vq)
    assert_library_flags(create_method("cosine", dim=D, codebook_size=K).vq, use_cosine_sim=True)
    assert_library_flags(create_method("rotation", dim=D, codebook_size=K).vq, rotation_trick=True,
                         ema_update=False, learnable_codebook=True, commitment_weight=0.0)
    assert isinstance(create_method("rotation", dim=D, codebook_size=K).vq._codebook.embed, torch.nn.Parameter)


def ema_setup(name, decay, seed=0):
    q = create_method(name, dim=D, codebook_size=K, decay=decay).train()
    codebook = q.vq._codebook
    g = gen(seed)
    start = torch.randn(K, D, generator=g)
    if name == "cosine":
        start = start / start.norm(dim=1, keepdim=True)
    sizes = torch.rand(K, generator=g) * 3 + 0.5
    sums = torch.randn(K, D, generator=g)
    with torch.no_grad():
        codebook.embed.copy_(start[None])
        codebook.cluster_size.copy_(sizes[None])
        codebook.embed_avg.copy_(sums[None])
    return q, start.double(), sizes.double(), sums.double()


@pytest.mark.parametrize("name", ["ema", "cosine"])
def test_ema_codebook_after_one_step_with_decay_d(name):
    """N_k <- d N_k + (1 - d) n_k,  m_k <- d m_k + (1 - d) sum_{i: k_i = k} x_i,
    e_k = m_k / N~_k with N~ the Laplace-smoothed sizes (N_k + eps) / (sum N + K eps) * sum N (eps 1e-5);
    cosine: x = z / |z|, the nearest code by largest cosine, and e_k renormalized to unit length."""
    decay = 0.9
    q, start, sizes, sums = ema_setup(name, decay)
    z = feature_map(seed=5, dtype=torch.float32, scale=2.0)
    q(z)

    x = rows_of(z).double()
    if name == "cosine":
        x = x / x.norm(dim=1, keepdim=True)
        k = (x @ start.t()).argmax(1)
    else:
        k = nearest(x, start)
    counts = torch.bincount(k, minlength=K).double()
    new_sizes = decay * sizes + (1 - decay) * counts
    new_sums = decay * sums + (1 - decay) * scatter_rows(x, k, K)
    smoothed = (new_sizes + 1e-5) / (new_sizes.sum() + K * 1e-5) * new_sizes.sum()
    new_codes = new_sums / smoothed[:, None]
    if name == "cosine":
        new_codes = new_codes / new_codes.norm(dim=1, keepdim=True)
    codebook = q.vq._codebook
    assert counts.sum() == x.shape[0] and (counts == 0).any()  # some codes unused: their sizes only decay
    torch.testing.assert_close(codebook.cluster_size[0].double(), new_sizes, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(codebook.embed_avg[0].double(), new_sums, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(q.export_codebook().double(), new_codes, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["ema", "cosine"])
def test_ema_output_loss_and_encoder_gradient(name):
    """The decoder sees the code chosen before the update; aux = 0.25 |x - sg(e)|^2; the gradient reaches z
    unchanged (straight through, no rotation) plus the commitment term's, through x = z / |z| for cosine."""
    q, start, _, _ = ema_setup(name, 0.99, seed=1)
    z = feature_map(seed=6, dtype=torch.float32, scale=2.0).requires_grad_()
    upstream = feature_map(seed=7, dtype=torch.float32)
    out = q(z)
    grad_z = torch.autograd.grad((out.quantized * upstream).sum() + out.aux_loss, z)[0]

    rows = rows_of(z.detach()).double()
    x = rows / rows.norm(dim=1, keepdim=True) if name == "cosine" else rows
    k = (x @ start.t()).argmax(1) if name == "cosine" else nearest(x, start)
    e = start[k]
    n = x.numel()
    grad_x = rows_of(upstream).double() + 0.25 * 2 * (x - e) / n
    if name == "cosine":  # d(z/|z|)/dz = (I - x x^T) / |z|, symmetric
        grad_x = (grad_x - x * (x * grad_x).sum(1, keepdim=True)) / rows.norm(dim=1, keepdim=True)
    assert torch.equal(out.indices.reshape(-1), k)
    torch.testing.assert_close(rows_of(out.quantized).double(), e, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.aux_loss.double(), 0.25 * ((x - e) ** 2).mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(rows_of(grad_z).double(), grad_x, rtol=1e-4, atol=1e-6)
    assert not any(p.requires_grad for p in q.parameters())  # the codebook learns by EMA only


# --- rotation: Fifty et al. 2024 ------------------------------------------------------------------------------

def plane_rotation(a, b):
    """The rotation taking unit a to unit b in their plane, identity on its complement (Rodrigues' form, not
    the Householder form the library uses): R = I + s (w a^T - a w^T) + (c - 1)(a a^T + w w^T),
    c = a.b, w = (b - c a) / |b - c a|, s = |b - c a|. (N, D), (N, D) -> (N, D, D)."""
    c = (a * b).sum(1)
    w = b - c[:, None] * a
    s = w.norm(dim=1)
    w = w / s[:, None]
    eye = torch.eye(a.shape[1], dtype=a.dtype).expand(a.shape[0], -1, -1)
    outer = lambda u, v: u[:, :, None] * v[:, None, :]  # noqa: E731
    return eye + s[:, None, None] * (outer(w, a) - outer(a, w)) + (c - 1)[:, None, None] * (outer(a, a) + outer(w, w))


def test_rotation_trick_gradient_is_the_transposed_rotation_scaled_by_the_norm_ratio():
    """Forward: exactly the nearest code q. Backward: lambda R^T g for the decoder gradient g, with R the rotation
    taking e/|e| to q/|q| and lambda = |q| / |e|; plus the commitment term 0.25 * 2 (e - q) / (N D). The codebook
    gets only its codebook term 1.0 * 2 (q - e) / (N D)."""
    q = create_method("rotation", dim=D, codebook_size=K).train()
    embed = q.vq._codebook.embed
    with torch.no_grad():
        embed.copy_(torch.randn(1, K, D, generator=gen(8)))
    z = feature_map(seed=9, dtype=torch.float32).requires_grad_()
    upstream = feature_map(seed=10, dtype=torch.float32)
    out = q(z)
    grad_z, grad_embed = torch.autograd.grad((out.quantized * upstream).sum() + out.aux_loss, [z, embed])

    e = rows_of(z.detach()).double()
    codebook = embed.detach()[0].double()
    k = nearest(e, codebook)
    code = codebook[k]
    n = e.numel()
    e_norm, code_norm = e.norm(dim=1, keepdim=True), code.norm(dim=1, keepdim=True)
    rotation = plane_rotation(e / e_norm, code / code_norm)  # (N, D, D)
    assert torch.allclose(torch.einsum("nij,nj->ni", rotation, e / e_norm), code / code_norm, atol=1e-12)
    g = rows_of(upstream).double()
    expected_z = (code_norm / e_norm) * torch.einsum("nji,nj->ni", rotation, g) + 0.25 * 2 * (e - code) / n
    expected_embed = scatter_rows(1.0 * 2 * (code - e) / n, k, K)

    assert torch.equal(out.indices.reshape(-1), k)
    torch.testing.assert_close(rows_of(out.quantized.detach()).double(), code, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.aux_loss.double(), 1.25 * ((e - code) ** 2).mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(rows_of(grad_z).double(), expected_z, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_embed[0].double(), expected_embed, rtol=1e-4, atol=1e-7)


# --- fsq: Mentzer et al. 2024 ---------------------------------------------------------------------------------

def fsq_bound(x, levels):
    """The FSQ paper's bound (appendix A): half_l = (L - 1)(1 + 1e-3) / 2, offset 0.5 for even L, shift such that
    bound(0) = 0, i.e. atanh(offset / half_l) (the paper's listing writes tan, equal to 1e-3 here), then
    tanh(x + shift) * half_l - offset. Returns (bounded, its derivative)."""
    levels = torch.tensor(levels, dtype=x.dtype)
    half_l = (levels - 1) * (1 + 1e-3) / 2
    offset = torch.where(levels % 2 == 0, 0.5, 0.0).to(x.dtype)
    t = torch.tanh(x + torch.atanh(offset / half_l))
    return t * half_l - offset, (1 - t**2) * half_l


def test_fsq_rounds_the_bounded_projection_and_indexes_it_in_mixed_radix():
    levels = (4, 5, 3)  # even and odd
    q = create_method("fsq", dim=D, codebook_size=60, levels=list(levels)).train()
    assert q.codebook_size == 60
    z = feature_map(seed=11, dtype=torch.float32, scale=2.0).requires_grad_()
    upstream = feature_map(seed=12, dtype=torch.float32)
    out = q(z)
    grad_z = torch.autograd.grad((out.quantized * upstream).sum(), z)[0]

    w_in, b_in = q.fsq.project_in.weight.detach().double(), q.fsq.project_in.bias.detach().double()
    w_out, b_out = q.fsq.project_out.weight.detach().double(), q.fsq.project_out.bias.detach().double()
    x = rows_of(z.detach()).double() @ w_in.t() + b_in  # (N, 3)
    bounded, slope = fsq_bound(x, levels)
    half_width = torch.tensor([lv // 2 for lv in levels], dtype=torch.float64)
    digits = torch.round(bounded)  # integers in [-(L//2), L - 1 - L//2]
    codes = digits / half_width
    basis = torch.tensor([1, levels[0], levels[0] * levels[1]], dtype=torch.float64)
    index = ((digits + half_width) * basis).sum(1)
    # straight-through rounding: d out / d z = W_out diag(bound' / (L // 2)) W_in
    expected_grad = ((rows_of(upstream).double() @ w_out) * slope / half_width) @ w_in

    assert ((digits + half_width >= 0) & (digits + half_width < torch.tensor(levels))).all()
    assert len(index.unique()) > 10  # the input reaches many codes
    assert torch.equal(out.indices.reshape(-1).double(), index)
    torch.testing.assert_close(rows_of(out.quantized.detach()).double(), codes @ w_out.t() + b_out, rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(rows_of(grad_z).double(), expected_grad, rtol=1e-4, atol=1e-5)
    assert float(out.aux_loss) == 0.0
    # quant_error: the mean squared rounding error in the bounded code space, each channel scaled by 1 / (L // 2)
    torch.testing.assert_close(out.quant_error.double(), (((bounded - digits) / half_width) ** 2).mean(), rtol=1e-5,
                               atol=0)
    flags = q.fsq
    assert (flags.preserve_symmetry, flags.noise_dropout, flags.bound_hard_clamp, flags.orthogonal_rotation,
            flags.scale, flags.num_codebooks, flags.force_quantization_f32) == (False, 0.0, False, False, None, 1,
                                                                                 True)


# --- lfq: Yu et al. 2024 ----------------------------------------------------------------------------------------

def entropy(p):
    return -(p * p.clamp_min(1e-30).log()).sum(-1)


def test_lfq_bits_codes_and_entropy_terms():
    """Bits: sign of each projected channel, index = the bits read as a binary number, first channel most
    significant. aux = w_H (mean_i H(p_i) - gamma H(mean_i p_i)) + w_c |x - sg(sign x)|^2, where
    p_i = softmax over the K codes c of 2 * inv_temperature * x_i . c."""
    q = create_method("lfq", dim=D, codebook_size=K, entropy_loss_weight=0.3, commitment_loss_weight=0.2,
                      diversity_gamma=1.5, inv_temperature=0.5).train()
    z = feature_map(seed=13, dtype=torch.float32).requires_grad_()
    upstream = feature_map(seed=14, dtype=torch.float32)
    out = q(z)
    grad_z = torch.autograd.grad((out.quantized * upstream).sum(), z, retain_graph=True)[0]

    bits = 4
    w_in, b_in = q.lfq.project_in.weight.detach().double(), q.lfq.project_in.bias.detach().double()
    w_out, b_out = q.lfq.project_out.weight.detach().double(), q.lfq.project_out.bias.detach().double()
    x = rows_of(z.detach()).double() @ w_in.t() + b_in  # (N, 4)
    sign = torch.where(x > 0, 1.0, -1.0).double()
    index = ((x > 0).long() * torch.tensor([8, 4, 2, 1])).sum(1)
    all_codes = torch.tensor([[1.0 if (c >> (bits - 1 - j)) & 1 else -1.0 for j in range(bits)] for c in range(K)],
                             dtype=torch.float64)  # code c's sign pattern, most significant bit first
    p = (2 * 0.5 * x @ all_codes.t()).softmax(1)  # (N, K)
    per_sample, batch = entropy(p).mean(), entropy(p.mean(0))
    commitment = ((x - sign) ** 2).mean()

    assert torch.equal(out.indices.reshape(-1), index)
    assert torch.equal(all_codes[index], sign)
    torch.testing.assert_close(rows_of(out.quantized.detach()).double(), sign @ w_out.t() + b_out, rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(out.diagnostics["per_sample_entropy"].double(), per_sample, rtol=1e-4, atol=0)
    torch.testing.assert_close(out.diagnostics["batch_entropy"].double(), batch, rtol=1e-4, atol=0)
    assert 0.5 < float(per_sample) < math.log(K) and float(batch) > float(per_sample)  # a non-degenerate check
    torch.testing.assert_close(out.aux_loss.double(), 0.3 * (per_sample - 1.5 * batch) + 0.2 * commitment,
                               rtol=1e-4, atol=1e-6)
    # sign with a straight-through gradient: d out / d z = W_out W_in
    torch.testing.assert_close(rows_of(grad_z).double(), rows_of(upstream).double() @ w_out @ w_in, rtol=1e-4,
                               atol=1e-5)


def test_lfq_names_its_library_flags_and_defaults():
    q = create_method("lfq", dim=D, codebook_size=K)
    lfq = q.lfq
    assert q.inv_temperature == 100.0
    assert (lfq.entropy_loss_weight, lfq.commitment_loss_weight, lfq.diversity_gamma) == (0.1, 0.25, 1.0)
    assert (lfq.frac_per_sample_entropy, lfq.codebook_scale, lfq.num_codebooks, lfq.spherical,
            lfq.orthogonal_rotation, lfq.soft_clamp_input_value, lfq.experimental_softplus_entropy_loss,
            lfq.has_projections) == (1.0, 1.0, 1, False, False, None, False, True)
    assert isinstance(lfq.activation, torch.nn.Identity)


# --- simvq: Zhu et al. 2024 ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("codebook_weight, commitment_weight", [(1.0, 0.25), (0.5, 0.4)])
def test_simvq_codes_are_the_frozen_basis_times_the_learned_map(codebook_weight, commitment_weight):
    """C = Q W^T with Q a frozen buffer; VQ-VAE loss on C: the codebook term's gradient reaches only W,
    dL/dW = (2 cb / (N D)) sum_i (c_i - z_i) Q_{k_i}^T; the decoder's gradient reaches z straight through."""
    q = create_method("simvq", dim=D, codebook_size=K, codebook_weight=codebook_weight,
                      commitment_weight=commitment_weight).train()
    sim = q.sim
    basis, weight = sim.frozen_codebook, sim.code_transform.weight
    assert not basis.requires_grad and all(p is not basis for p in q.parameters())
    assert [p.shape for p in q.parameters()] == [(D, D)]  # the linear map is the only parameter
    assert sim.rotation_trick is False and sim.code_transform.bias is None
    z = feature_map(seed=15, dtype=torch.float32).requires_grad_()
    upstream = feature_map(seed=16, dtype=torch.float32)
    out = q(z)
    grad_z, grad_w = torch.autograd.grad((out.quantized * upstream).sum() + out.aux_loss, [z, weight])

    basis64, w64 = basis.double(), weight.detach().double()
    codebook = basis64 @ w64.t()
    y = rows_of(z.detach()).double()
    k, c, aux, grad_y, _ = vq_expectation(y, codebook, rows_of(upstream).double(), codebook_weight,
                                          commitment_weight)
    n = y.numel()
    expected_w = (2 * codebook_weight / n) * (c - y).t() @ basis64[k]
    assert torch.equal(out.indices.reshape(-1), k)
    torch.testing.assert_close(q.export_codebook().double(), codebook, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rows_of(out.quantized.detach()).double(), c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.aux_loss.double(), aux, rtol=1e-5, atol=0)
    torch.testing.assert_close(rows_of(grad_z).double(), grad_y, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad_w.double(), expected_w, rtol=1e-4, atol=1e-6)

    # a step of the autoencoder's optimizer moves W, never Q
    frozen = basis.clone()
    optimizer = torch.optim.SGD(q.parameters(), lr=0.1)
    weight.grad = grad_w
    optimizer.step()
    assert torch.equal(sim.frozen_codebook, frozen) and not torch.equal(weight.detach().double(), w64)
    torch.testing.assert_close(q.export_codebook(), frozen @ weight.detach().t())


def test_simvq_basis_is_gaussian_with_variance_one_over_d():
    torch.manual_seed(0)
    basis = create_method("simvq", dim=64, codebook_size=4096).sim.frozen_codebook
    assert abs(float(basis.mean())) < 0.01
    assert float(basis.var()) == pytest.approx(1 / 64, rel=0.03)


# --- cvq: Zheng and Vedaldi 2023 ----------------------------------------------------------------------------------

def cvq_setup(seed, **options):
    """float32: the adapter's interventions run on float32 features whatever the input's dtype."""
    q = create_method("cvq", dim=D, codebook_size=K, kmeans_init=False, **options).train()
    g = gen(seed)
    start = torch.randn(K, D, generator=g)
    start[:4] += 20.0  # four codes far from every feature: unused
    usage = torch.rand(K, generator=g) * 0.02
    with torch.no_grad():
        q.codebook.weight.copy_(start)
        q.usage.copy_(usage)
    return q, start.double(), usage.double()


def closest_features(rows, codebook):
    """For each code, the batch feature nearest to it (full squared distance): (K, D)."""
    return rows[((codebook[:, None, :] - rows[None, :, :]) ** 2).sum(-1).argmin(1)]


def test_cvq_reanchors_by_the_authors_soft_rule():
    """usage_k <- d usage_k + (1 - d) n_k / N;  a_k = exp(-10 K usage_k / (1 - d) - 1e-3);
    c_k <- (1 - a_k) c_k + a_k * (the batch feature closest to c_k)."""
    d = 0.9
    q, start, usage = cvq_setup(17, usage_decay=d)
    z = feature_map(seed=18, b=4, dtype=torch.float32)
    out = q(z)
    rows = rows_of(z).double()
    k = nearest(rows, start)
    new_usage = d * usage + (1 - d) * torch.bincount(k, minlength=K).double() / len(k)
    alpha = torch.exp(-10 * K * new_usage / (1 - d) - 1e-3)
    expected = (1 - alpha[:, None]) * start + alpha[:, None] * closest_features(rows, start)
    assert torch.equal(out.indices.reshape(-1), k)
    torch.testing.assert_close(q.usage.double(), new_usage, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(q.codebook.weight.detach().double(), expected, rtol=1e-5, atol=1e-5)
    assert 0 < int((alpha > 0.5).sum()) < K and int(out.diagnostics["reanchored_codes"]) == int((alpha > 0.5).sum())


def test_cvq_hard_rule_uses_the_bias_corrected_share():
    """With dead_threshold t: a_k = 1 where K usage_k / (1 - d^n) < t after n updates, else 0."""
    d, t = 0.8, 0.5
    q, start, usage = cvq_setup(19, usage_decay=d, dead_threshold=t, anchor="closest")
    with torch.no_grad():
        q.usage_weight.fill_(1 - d)  # as after one earlier update
    z = feature_map(seed=20, b=4, dtype=torch.float32)
    q(z)
    rows = rows_of(z).double()
    new_usage = d * usage + (1 - d) * torch.bincount(nearest(rows, start), minlength=K).double() / rows.shape[0]
    weight = 1 - d**2
    dead = K * new_usage / weight < t
    expected = torch.where(dead[:, None], closest_features(rows, start), start)
    assert 4 <= int(dead.sum()) < K
    torch.testing.assert_close(q.usage_weight.double(), torch.tensor(weight, dtype=torch.float64), rtol=1e-6,
                               atol=0)
    torch.testing.assert_close(q.codebook.weight.detach().double(), expected, rtol=1e-6, atol=1e-6)


def test_cvq_keeps_vq_vaes_loss_and_gradients():
    q, start, _ = cvq_setup(21)
    z = feature_map(seed=22, dtype=torch.float32).requires_grad_()
    upstream = feature_map(seed=23, dtype=torch.float32)
    out = q(z)
    grad_z, grad_codebook = torch.autograd.grad((out.quantized * upstream).sum() + out.aux_loss,
                                                [z, q.codebook.weight])
    k, e, aux, grad_y, expected_codebook = vq_expectation(rows_of(z).double(), start, rows_of(upstream).double(),
                                                          1.0, 0.25)
    assert torch.equal(out.indices.reshape(-1), k)
    torch.testing.assert_close(out.aux_loss.double(), aux, rtol=1e-5, atol=0)
    torch.testing.assert_close(rows_of(grad_z).double(), grad_y, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_codebook.double(), expected_codebook, rtol=1e-5, atol=1e-7)


# --- affine: Huh et al. 2023 ------------------------------------------------------------------------------------

def test_affine_codes_are_scaled_and_shifted_with_the_lr_multiplier():
    """c_k = c'_k * (1 + m s_raw) + m b_raw; the VQ-VAE gradient G on the codes reaches
    c' as G * scale, s_raw as m sum_k G_k * c'_k and b_raw as m sum_k G_k."""
    m = 7.0
    q = create_method("affine", dim=D, codebook_size=K, lr_multiplier=m).double().train()
    g = gen(24)
    with torch.no_grad():
        q.base_codebook.copy_(torch.randn(K, D, generator=g, dtype=torch.float64))
        q.scale_raw.copy_(torch.randn(D, generator=g, dtype=torch.float64) * 0.05)
        q.shift_raw.copy_(torch.randn(D, generator=g, dtype=torch.float64) * 0.05)
    base, s_raw, b_raw = q.base_codebook.detach(), q.scale_raw.detach(), q.shift_raw.detach()
    scale, shift = 1 + m * s_raw, m * b_raw
    codebook = base * scale + shift
    z = feature_map(seed=25).requires_grad_()
    upstream = feature_map(seed=26)
    out = q(z)
    grads = torch.autograd.grad((out.quantized * upstream).sum() + out.aux_loss,
                                [z, q.base_codebook, q.scale_raw, q.shift_raw])
    k, e, aux, grad_y, grad_codes = vq_expectation(rows_of(z), codebook, rows_of(upstream), 1.0, 0.25)

    torch.testing.assert_close(q.export_codebook(), codebook, rtol=1e-12, atol=1e-12)
    assert torch.equal(out.indices.reshape(-1), k)
    torch.testing.assert_close(out.quantized, map_of(e, z), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.aux_loss, aux, rtol=1e-12, atol=0)
    torch.testing.assert_close(rows_of(grads[0]), grad_y, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(grads[1], grad_codes * scale, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(grads[2], m * (grad_codes * base).sum(0), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(grads[3], m * grad_codes.sum(0), rtol=1e-10, atol=1e-14)
    assert method_options("affine")["lr_multiplier"] == 10.0 and method_options("affine")["sync_nu"] == 0.0


def test_affine_synchronized_update_weights_the_decoder_gradient_on_the_codes_by_nu():
    """Decoder input z + sg(q - z) + nu (q - sg(q)): the codes receive nu times the decoder's gradient."""
    nu = 0.3
    q = create_method("affine", dim=D, codebook_size=K, sync_nu=nu, codebook_weight=0.0,
                      commitment_weight=0.0).double().train()
    with torch.no_grad():
        q.base_codebook.copy_(torch.randn(K, D, generator=gen(27), dtype=torch.float64))
    z, upstream = feature_map(seed=28), feature_map(seed=29)
    out = q(z)
    grad = torch.autograd.grad((out.quantized * upstream).sum(), q.base_codebook)[0]
    k = nearest(rows_of(z), q.base_codebook.detach())
    torch.testing.assert_close(grad, scatter_rows(nu * rows_of(upstream), k, K), rtol=1e-12, atol=1e-14)


# --- gumbel ----------------------------------------------------------------------------------------------------

def test_gumbel_aux_is_kl_weight_times_the_kl_of_the_code_distribution_to_uniform():
    """aux = w * mean_i sum_k q_ik log(q_ik / (1/K)), q_i = softmax of position i's logits (no noise, no tau)."""
    q = create_method("gumbel", dim=D, codebook_size=K, kl_weight=0.3).eval()
    z = feature_map(seed=30, scale=2.0, dtype=torch.float32)
    with torch.no_grad():
        out = q(z)
    weight, bias = q.to_logits.weight.detach()[:, :, 0, 0].double(), q.to_logits.bias.detach().double()
    logits = rows_of(z).double() @ weight.t() + bias
    p = logits.softmax(1)
    kl = (p * (p.log() - math.log(1 / K))).sum(1).mean()
    assert float(kl) > 0.05
    torch.testing.assert_close(out.aux_loss.double(), 0.3 * kl, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.diagnostics["kl_to_uniform"].double(), kl, rtol=1e-5, atol=0)
    assert torch.equal(out.indices.reshape(-1), logits.argmax(1))  # evaluation: the argmax
    assert method_options("gumbel") == {"kl_weight": 5e-4, "tau_start": 1.0, "tau_end": 1 / 16, "schedule": "cosine"}


# --- mq, mq-alt: the generated codebook and the bi-level step ---------------------------------------------------

def mq_model(method="mq", **options):
    """A float64 tiny VQ-VAE with an MQ quantizer (linear hyper-net), as in tests/test_mq.py."""
    torch.manual_seed(0)
    options = {"hyper_net": "linear", "latent_dim": 8, **options}
    model = build_model(RunSpec(method=method, width=16, res_blocks=1, res_width=8, code_dim=D, codebook_size=K,
                                method_options=options))
    model.double()
    model.preprocess = lambda images: VQModel.preprocess(images).double()
    return model


def image_batch(seed, n=4):
    return torch.randint(0, 256, (n, 3, 32, 32), generator=gen(seed), dtype=torch.uint8)


def mq_context(model, draw, total_steps=100):
    model.quantizer.setup_training(total_steps)
    return TrainContext(model=model, loss_fn=model.task_loss,
                        optimizer=torch.optim.AdamW(model.autoencoder_parameters(), 1e-3), draw_batch=draw,
                        total_steps=total_steps)


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def test_mq_aux_is_rate_times_vq_vaes_terms_on_the_generated_codebook():
    """aux = rate (cm |y - sg(e)|^2 + cb |e - sg(y)|^2) with y = LN(z) and e from C = h_phi(E);
    the codebook term's gradient reaches (E, phi) through the hyper-net."""
    rate, cm, cb = 0.1, 0.3, 0.7
    model = mq_model(rate=rate, commitment_weight=cm, codebook_weight=cb)
    q = model.quantizer
    randomize_(q.pre, seed=31)
    z = feature_map(seed=32).requires_grad_()
    upstream = feature_map(seed=33)
    out = q(z)
    phi = q.method_parameters()
    grads = torch.autograd.grad((out.quantized * upstream).sum() + out.aux_loss, [z, *phi])

    codebook = q.codebook_net.net(q.codebook_net.latents)  # C = W E^T + b, the linear hyper-net
    y = channel_layernorm(z, q.pre.norm)
    k, e, aux, grad_y, grad_codes = vq_expectation(y, codebook, rows_of(upstream), rate * cb, rate * cm)
    expected_z = torch.autograd.grad(y, z, grad_outputs=grad_y)[0]
    expected_phi = torch.autograd.grad(codebook, phi, grad_outputs=grad_codes)
    assert torch.equal(out.indices.reshape(-1), k)
    torch.testing.assert_close(out.quantized, map_of(e, z), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.aux_loss, aux, rtol=1e-12, atol=0)
    torch.testing.assert_close(grads[0], expected_z, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(flat(grads[1:]), flat(expected_phi), rtol=1e-10, atol=1e-14)


def inner_codebook_gradient(model, images):
    """grad_phi of the inner loss, written out: the only term reaching phi is
    rate * cb * mean |e_k - sg(y)|^2 with y = LN(enc(x)) and k its nearest code."""
    q = model.quantizer
    with torch.no_grad():
        y = channel_layernorm(model.encode(model.preprocess(images)), q.pre.norm)
    codebook = q.codebook_net.net(q.codebook_net.latents)
    loss = q.rate * q.codebook_weight * ((codebook[nearest(y, codebook.detach())] - y) ** 2).mean()
    return flat(torch.autograd.grad(loss, q.method_parameters()))


def encoder_jvp(model, images, theta, v):
    """J_y v: the derivative of y = LN(enc_theta(x)) along v, by forward-mode autograd over theta."""
    q = model.quantizer
    names = {id(p): n for n, p in model.named_parameters()}
    state = {n: p.detach() for n, p in model.named_parameters()}
    x = model.preprocess(images)

    def search_input(*values):
        params = {**state, **{names[id(p)]: value for p, value in zip(theta, values)}}
        z = torch.func.functional_call(model.encoder, {n[len("encoder."):]: t for n, t in params.items()
                                                       if n.startswith("encoder.")}, (x,))
        pre = {n[len("quantizer.pre."):]: t for n, t in params.items() if n.startswith("quantizer.pre.")}
        return F.layer_norm(z.permute(0, 2, 3, 1), (D,), pre["norm.weight"], pre["norm.bias"], q.pre.norm.eps)

    y, jv = torch.func.jvp(search_input, tuple(p.detach() for p in theta), tuple(v))
    return y.reshape(-1, D), jv.reshape(-1, D)


@pytest.mark.parametrize("hypergrad", ["darts", "jvp"])
def test_mq_outer_gradient_is_the_direct_gradient_plus_the_meta_term_sign_included(hypergrad):
    """g_phi = d_phi L_outer + T, at the current theta, v = grad_theta L_outer, eps = fd_radius / |v|, with
    darts: T = [grad_phi L_inner(theta - eps v) - grad_phi L_inner(theta + eps v)] / (2 eps), here a finite
    difference of the written-out inner gradient; jvp: T = +(2 rate cb / (N d)) sum_i (d e_{k_i}/d phi)^T (J v)_i,
    J v by forward-mode autograd through the encoder. The two T agree to the finite-difference error."""
    model = mq_model(hypergrad=hypergrad)
    q = model.quantizer
    inner, outer = image_batch(34), image_batch(35)
    ctx = mq_context(model, lambda: outer)
    theta, phi = q.theta(ctx), q.method_parameters()
    assert {id(p) for p in theta} == {id(p) for p in model.autoencoder_parameters()}

    loss, _ = model.task_loss(outer)
    grads = torch.autograd.grad(loss, [*theta, *phi])
    v, direct = list(grads[:len(theta)]), flat(grads[len(theta):])
    eps = q.fd_radius / flat(v).norm()
    saved = [p.detach().clone() for p in theta]

    def inner_gradient_at(scale):
        with torch.no_grad():
            for p, s, d in zip(theta, saved, v):
                p.copy_(s + scale * d)
        try:
            return inner_codebook_gradient(model, inner)
        finally:
            with torch.no_grad():
                for p, s in zip(theta, saved):
                    p.copy_(s)

    finite_difference = (inner_gradient_at(-eps) - inner_gradient_at(eps)) / (2 * eps)
    y, jv = encoder_jvp(model, inner, theta, v)
    codebook = q.codebook_net.net(q.codebook_net.latents)
    k = nearest(y, codebook.detach())
    jvp = flat(torch.autograd.grad(2 * q.rate * q.codebook_weight / y.numel() * (codebook[k] * jv).sum(), phi))
    assert finite_difference.norm() > 1e-3 * direct.norm()  # the term matters at the test's tolerance
    torch.testing.assert_close(finite_difference, jvp, rtol=2e-3, atol=1e-3 * float(jvp.norm()))

    received = flat(q.outer_gradient(ctx, inner))
    term = finite_difference if hypergrad == "darts" else jvp
    torch.testing.assert_close(received, direct + term, rtol=1e-8, atol=1e-10 * float(direct.norm()))
    assert all(torch.equal(p, s) for p, s in zip(theta, saved))  # theta left as it was


def test_mq_alt_outer_gradient_is_the_direct_gradient_alone():
    model = mq_model("mq-alt")
    q = model.quantizer
    outer = image_batch(36)
    ctx = mq_context(model, lambda: outer)
    loss, _ = model.task_loss(outer)
    direct = flat(torch.autograd.grad(loss, q.method_parameters()))
    torch.testing.assert_close(flat(q.outer_gradient(ctx, image_batch(37))), direct, rtol=1e-9, atol=1e-14)


def test_mq_outer_update_is_sgd_with_momentum_on_the_mean_accumulated_gradient_at_the_scheduled_rate():
    model = mq_model(outer_lr=0.05, outer_momentum=0.9, outer_warmup=0.0)
    q = model.quantizer
    mq_context(model, None, total_steps=40)
    phi = q.method_parameters()
    start = flat(phi).detach().clone()
    g1 = [torch.randn(p.shape, generator=gen(40 + i), dtype=p.dtype) for i, p in enumerate(phi)]
    g2 = [torch.randn(p.shape, generator=gen(60 + i), dtype=p.dtype) for i, p in enumerate(phi)]
    q.accumulate(g1)
    q.accumulate(g2)
    q.outer_update(step=10)
    rate = 0.05 * 0.5 * (1 + math.cos(math.pi * 10 / 40))  # no warm-up: cosine from step 0 of 40
    mean = (flat(g1) + flat(g2)) / 2
    torch.testing.assert_close(flat(phi).detach(), start - rate * mean, rtol=1e-12, atol=1e-15)
    # second update: momentum buffer b = 0.9 b + g, step lr * b
    q.accumulate(g1)
    q.outer_update(step=20)
    rate2 = 0.05 * 0.5 * (1 + math.cos(math.pi * 20 / 40))
    torch.testing.assert_close(flat(phi).detach(), start - rate * mean - rate2 * (0.9 * mean + flat(g1)),
                               rtol=1e-12, atol=1e-15)
    assert q.outer_steps == 2 and all(p.grad is None for p in phi)


def test_mq_takes_an_outer_step_every_outer_every_inner_steps():
    model = mq_model("mq-alt", outer_every=3, outer_accum=2, outer_warmup=0.0)
    q = model.quantizer
    drawn = []
    ctx = mq_context(model, lambda: drawn.append(ctx.step) or image_batch(38), total_steps=12)
    updates = []
    for step in range(12):
        ctx.step = step
        q.training_step(ctx, image_batch(39 + step % 2))
        updates.append(q.outer_steps)
    assert drawn == [2, 5, 8, 11]  # after steps 3, 6, 9, 12
    assert updates == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2]  # one hyper-net step per 2 outer evaluations
