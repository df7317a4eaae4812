"""The method contract, for every registered method (a new method is covered with no edit here), and the
baselines' behavioural properties. The defining updates against independent formulas: tests/test_definitions_methods.py."""
from __future__ import annotations

import math

import pytest
import torch

from bench.models import build_model
from bench.spec import RunSpec
from methods import MethodError, TrainContext, create_method, list_methods, standard_step
from methods.fsq import PAPER_LEVELS
from methods import gumbel
from methods.gumbel import annealed_temperature, gumbel_noise
from methods.ste import StraightThroughVQ

D, K = 8, 16
OPTIONS = {"fsq": {"levels": [4, 4]}}  # prod = 16 = K; K=16 has no row in the FSQ paper's table
METHODS = [m for m in list_methods() if not m.startswith("test-")]  # test-only registrations excluded


def make(name: str, **options):
    return create_method(name, dim=D, codebook_size=K, **{**OPTIONS.get(name, {}), **options})


def feature_map(seed: int = 0, b: int = 2, h: int = 4, w: int = 4, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(b, D, h, w, generator=torch.Generator().manual_seed(seed)) * scale


def smooth_images(seed: int = 0, n: int = 8) -> torch.Tensor:
    """uint8 (n, 3, 32, 32): upsampled 8x8 noise, something a tiny autoencoder can start to fit in a few steps."""
    low = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    return (torch.nn.functional.interpolate(low, size=32, mode="bilinear") * 255).to(torch.uint8)


def tiny_model(name: str, **options):
    spec = RunSpec(method=name, width=16, res_blocks=1, res_width=8, code_dim=D, codebook_size=K,
                   method_options={**OPTIONS.get(name, {}), **options})
    return build_model(spec)


def context(model, images, total_steps: int = 10) -> TrainContext:
    model.setup_training(total_steps)
    model.quantizer.setup_training(total_steps)  # methods with their own optimizer (MQ) build it here
    return TrainContext(model=model, loss_fn=model.task_loss,
                        optimizer=torch.optim.AdamW(model.autoencoder_parameters(), 1e-3),
                        draw_batch=lambda: images, step=0, total_steps=total_steps)


# --- the contract, for every registered method ----------------------------------------------------------------

@pytest.mark.parametrize("name", METHODS)
def test_output_types_shapes_and_ranges(name):
    torch.manual_seed(0)
    q = make(name).train()
    z = feature_map(scale=3.0)
    out = q(z)
    assert out.quantized.shape == z.shape and out.quantized.dtype == z.dtype
    levels = (q.code_depth,) if q.code_depth > 1 else ()  # (B, H, W), or (B, H, W, D) with D codes per position
    assert out.indices.dtype == torch.int64 and out.indices.shape == (2, 4, 4, *levels)
    assert 0 <= int(out.indices.min()) and int(out.indices.max()) < q.codebook_size
    assert out.aux_loss.ndim == 0 and torch.isfinite(out.aux_loss)
    assert out.quant_error.ndim == 0 and torch.isfinite(out.quant_error) and float(out.quant_error) >= 0
    assert not out.quant_error.requires_grad
    assert all(v.ndim == 0 for v in out.diagnostics.values())


@pytest.mark.parametrize("name", METHODS)
def test_decode_indices_reproduces_the_eval_output(name):
    torch.manual_seed(0)
    q = make(name)
    q.train()(feature_map(seed=1))  # one training forward: k-means init, EMA update, etc. have happened
    q.eval()
    with torch.no_grad():
        out = q(feature_map(seed=2))
        decoded = q.decode_indices(out.indices)
    assert decoded.shape == out.quantized.shape
    torch.testing.assert_close(decoded, out.quantized, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", METHODS)
def test_bf16_input_gives_bf16_output_and_int64_codes(name):
    """As in a bf16 run: the encoder's bf16 output, under the run's autocast."""
    torch.manual_seed(0)
    q = make(name).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(feature_map().bfloat16())
    assert out.quantized.dtype == torch.bfloat16 and out.indices.dtype == torch.int64
    assert torch.isfinite(out.quantized.float()).all()
    assert out.aux_loss.ndim == 0 and torch.isfinite(out.aux_loss.float())
    assert 0 <= int(out.indices.min()) and int(out.indices.max()) < q.codebook_size


@pytest.mark.parametrize("name", METHODS)
def test_export_codebook_is_the_table_decode_indices_reads(name):
    torch.manual_seed(0)
    q = make(name)
    q.train()(feature_map(seed=1))
    q.eval()
    codebook = q.export_codebook()
    if codebook is None:  # allowed by the contract, but every registered method has one today
        pytest.fail(f"{name} exports no codebook")
    every_code = torch.arange(q.codebook_size).reshape(1, q.codebook_size, 1)  # (B, H, W) = (1, K, 1)
    if q.code_depth > 1:  # one codebook per level: code k at every level decodes to the sum of the levels' k-th codes
        assert codebook.shape == (q.code_depth, q.codebook_size, q.dim) and not codebook.requires_grad
        every_code = every_code[..., None].expand(-1, -1, -1, q.code_depth)  # (1, K, 1, depth)
        codebook = codebook.sum(0)
    assert codebook.shape == (q.codebook_size, q.dim) and not codebook.requires_grad
    with torch.no_grad():
        decoded = q.decode_indices(every_code)  # (1, D, K, 1)
    torch.testing.assert_close(decoded[0, :, :, 0].t(), codebook, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", METHODS)
def test_a_few_training_steps_lower_the_reconstruction_loss(name, one_thread):
    torch.manual_seed(0)
    images = smooth_images()
    model = tiny_model(name)
    ctx = context(model, images)

    def eval_loss():
        model.eval()
        with torch.no_grad():
            loss, _ = model.task_loss(images)
        model.train()
        return float(loss)

    before = eval_loss()
    for step in range(10):
        ctx.step = step
        result = model.quantizer.training_step(ctx, images)
        assert torch.isfinite(result.loss)
    assert eval_loss() < before


# --- gumbel ---------------------------------------------------------------------------------------------------

def test_gumbel_temperature_follows_each_schedule():
    start, end = 1.0, 1.0 / 16
    assert annealed_temperature(0, 100, start, end, "exp") == pytest.approx(start)
    assert annealed_temperature(100, 100, start, end, "exp") == pytest.approx(end)
    assert annealed_temperature(50, 100, start, end, "exp") == pytest.approx(math.sqrt(start * end))
    assert annealed_temperature(50, 100, start, end, "linear") == pytest.approx((start + end) / 2)
    assert annealed_temperature(25, 100, start, end, "cosine") == pytest.approx(
        end + (start - end) * (1 + math.cos(math.pi / 4)) / 2)
    assert annealed_temperature(500, 100, start, end, "cosine") == pytest.approx(end)  # past the end: held


def test_gumbel_training_step_sets_the_temperature_from_the_step():
    torch.manual_seed(0)
    images = smooth_images(n=2)
    model = tiny_model("gumbel", schedule="linear", tau_start=2.0, tau_end=0.5)
    ctx = context(model, images, total_steps=4)
    seen = []
    for step in range(4):
        ctx.step = step
        seen.append(float(model.quantizer.training_step(ctx, images).output.diagnostics["temperature"]))
    assert seen == pytest.approx([2.0, 1.625, 1.25, 0.875])


def test_gumbel_sends_the_decoder_gradient_to_the_logits_through_a_hard_sample():
    torch.manual_seed(0)
    q = make("gumbel").train()
    z = feature_map().requires_grad_()
    out = q(z)
    # the decoder sees exactly the sampled codes...
    torch.testing.assert_close(out.quantized, q.decode_indices(out.indices), atol=0, rtol=0)
    # ...while the gradient flows to the logits' projection and into the encoder
    (out.quantized * feature_map(seed=3)).sum().backward()
    assert q.to_logits.weight.grad.abs().sum() > 0
    assert z.grad.abs().sum() > 0


def test_gumbel_estimator_matches_the_one_hot_straight_through_formula(monkeypatch):
    """Value and gradients equal those of (one_hot + y_soft - sg(y_soft)) @ C, written out here in full."""
    torch.manual_seed(0)
    q = make("gumbel").train()
    z = feature_map(h=8, w=8).requires_grad_()
    noise = gumbel_noise(torch.empty(2 * 8 * 8, q.codebook_size))
    monkeypatch.setattr(gumbel, "gumbel_noise", lambda like: noise)
    upstream = feature_map(seed=3, h=8, w=8)

    out = q(z)
    (out.quantized * upstream).sum().backward()
    ours = [t.grad.clone() for t in (z, q.to_logits.weight, q.codebook.weight)]
    for t in (z, q.to_logits.weight, q.codebook.weight):
        t.grad = None

    logits = q.to_logits(z).permute(0, 2, 3, 1).reshape(-1, q.codebook_size)
    y_soft = ((logits + noise) / q.temperature).softmax(-1)
    y_hard = torch.nn.functional.one_hot((logits + noise).argmax(-1), q.codebook_size).float()
    rows = (y_hard + (y_soft - y_soft.detach())) @ q.codebook.weight
    expected = rows.reshape(2, 8, 8, -1).permute(0, 3, 1, 2)
    (expected * upstream).sum().backward()
    assert torch.equal(out.quantized, expected)
    for mine, theirs in zip(ours, (z.grad, q.to_logits.weight.grad, q.codebook.weight.grad)):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7)


def test_gumbel_noise_is_standard_gumbel_and_finite():
    torch.manual_seed(0)
    samples = gumbel_noise(torch.empty(1_000_000))
    assert torch.isfinite(samples).all()
    euler_gamma = 0.5772156649
    assert float(samples.mean()) == pytest.approx(euler_gamma, abs=0.005)
    assert float(samples.std()) == pytest.approx(math.pi / math.sqrt(6), abs=0.005)
    # the CDF exp(-exp(-x)) at a few points
    for x in (-1.0, 0.0, 1.0, 3.0):
        assert float((samples <= x).float().mean()) == pytest.approx(math.exp(-math.exp(-x)), abs=0.003)


def test_gumbel_samples_in_training_and_takes_the_argmax_in_eval():
    torch.manual_seed(0)
    q = make("gumbel")
    z = feature_map(h=16, w=16)
    logits_argmax = q.to_logits(z).argmax(1)
    q.eval()
    assert torch.equal(q(z).indices, logits_argmax)
    q.train()
    assert not torch.equal(q(z).indices, logits_argmax)  # 512 positions at tau=1: some samples differ


def test_gumbel_kl_to_uniform_is_zero_for_flat_logits():
    q = make("gumbel", kl_weight=1.0)
    with torch.no_grad():
        q.to_logits.weight.zero_()
        q.to_logits.bias.zero_()
    with torch.no_grad():
        assert float(q.eval()(feature_map()).aux_loss) == pytest.approx(0.0, abs=1e-6)
        q.to_logits.bias[0] = 5.0
        assert float(q(feature_map()).aux_loss) > 0.1


def test_gumbel_refuses_an_unknown_schedule():
    with pytest.raises(MethodError, match="schedule"):
        make("gumbel", schedule="step")


# --- fsq ------------------------------------------------------------------------------------------------------

def test_fsq_takes_the_paper_levels_and_states_the_effective_codebook_size():
    for k, levels in PAPER_LEVELS.items():
        q = create_method("fsq", dim=D, codebook_size=k)
        assert q.levels == levels and q.codebook_size == math.prod(levels)
    assert create_method("fsq", dim=D, codebook_size=1024).codebook_size == 1000
    assert create_method("fsq", dim=D, codebook_size=512).export_note()["levels"] == [8, 8, 8]


def test_fsq_refuses_an_unlisted_size_without_levels_and_names_the_fix():
    with pytest.raises(MethodError, match=r"levels="):
        create_method("fsq", dim=D, codebook_size=1000)
    with pytest.raises(MethodError, match=">= 3"):
        create_method("fsq", dim=D, codebook_size=16, levels=[2, 8])
    assert create_method("fsq", dim=D, codebook_size=16, levels="4,4").levels == (4, 4)  # as from a command line


def test_fsq_indices_cover_exactly_the_implicit_codebook():
    q = create_method("fsq", dim=D, codebook_size=1024).eval()  # levels 8,5,5,5: 1000 codes
    with torch.no_grad():
        out = q(feature_map(b=8, h=16, w=16, scale=10.0))  # large inputs reach the outermost levels
        assert 0 <= int(out.indices.min()) and int(out.indices.max()) < 1000
        assert int(out.indices.max()) > 900
        torch.testing.assert_close(q.decode_indices(out.indices), out.quantized, atol=1e-5, rtol=1e-5)
        assert q.export_codebook().shape == (1000, D)


def test_fsq_quant_error_is_the_rounding_error_of_the_libraries_own_bound():
    q = create_method("fsq", dim=D, codebook_size=1024)
    with torch.no_grad():
        projected = q.project(feature_map(scale=3.0))
        unrounded, codes = q.unrounded_codes(projected), q.fsq.quantize(projected)
        half_width = (q.fsq._levels // 2).float()
        # our copy of the bound rounds to the library's codes, within half a level
        assert torch.equal((unrounded * half_width).round(), codes * half_width)
        assert ((unrounded - codes).abs() <= 0.5 / half_width + 1e-6).all()
        err = q(feature_map(scale=3.0)).quant_error
    assert 0 < float(err) <= float((0.5 / half_width).pow(2).max())


# --- lfq ------------------------------------------------------------------------------------------------------

def test_lfq_refuses_a_size_that_is_not_a_power_of_two():
    with pytest.raises(MethodError, match="power of two"):
        create_method("lfq", dim=D, codebook_size=500)


def test_lfq_index_is_the_sign_pattern_of_the_projected_input():
    q = make("lfq").eval()
    z = feature_map()
    with torch.no_grad():
        out = q(z)
        x = q.lfq.project_in(z.permute(0, 2, 3, 1))  # (B, H, W, 4 bits)
    weights = 2 ** torch.arange(3, -1, -1)  # the first channel is the most significant bit
    assert torch.equal(out.indices, ((x > 0).long() * weights).sum(-1))


def test_lfq_entropy_loss_is_active_in_training_only():
    q = make("lfq", commitment_loss_weight=0.0)
    z = feature_map()
    train_aux = q.train()(z).aux_loss
    assert train_aux.requires_grad and float(train_aux.detach()) != 0.0
    assert float(q.eval()(z).aux_loss) == 0.0


# --- rotation -------------------------------------------------------------------------------------------------

def test_rotation_has_plain_vq_forward_but_rotated_encoder_gradient():
    torch.manual_seed(0)
    rotation, plain = make("rotation").train(), StraightThroughVQ(D, K).train()
    with torch.no_grad():
        codebook = torch.randn(K, D)
        rotation.vq.codebook.copy_(codebook)
        plain.codebook.weight.copy_(codebook)
    z = feature_map().requires_grad_()
    upstream = feature_map(seed=5)
    outs, grads = [], []
    for q in (rotation, plain):
        out = q(z)
        grads.append(torch.autograd.grad((out.quantized * upstream).sum(), z)[0])
        outs.append(out)
    assert torch.equal(outs[0].indices, outs[1].indices)
    torch.testing.assert_close(outs[0].quantized, outs[1].quantized, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0].aux_loss, outs[1].aux_loss)
    torch.testing.assert_close(grads[1], upstream)  # straight-through: copied
    assert (grads[0] - grads[1]).abs().max() > 1e-2
    # the rotation keeps the gradient's norm up to the factor |q| / |e|, per position
    q_norm = outs[1].quantized.detach().norm(dim=1)
    expected = upstream.norm(dim=1) * q_norm / z.detach().norm(dim=1)
    torch.testing.assert_close(grads[0].norm(dim=1), expected, atol=1e-4, rtol=1e-4)


def test_rotation_codebook_learns_only_from_its_codebook_loss():
    q = make("rotation", commitment_weight=0.0).train()
    codebook = q.vq._codebook.embed  # the parameter itself; q.vq.codebook is a fresh view of it
    assert codebook.requires_grad
    out = q(feature_map().requires_grad_())
    decoder_grad = torch.autograd.grad((out.quantized * feature_map(seed=5)).sum(), codebook,
                                       retain_graph=True, allow_unused=True)[0]
    assert decoder_grad is None or decoder_grad.abs().max() == 0
    assert torch.autograd.grad(out.aux_loss, codebook)[0].abs().sum() > 0


# --- cosine ---------------------------------------------------------------------------------------------------

def test_cosine_picks_the_code_of_largest_cosine_and_outputs_unit_vectors():
    torch.manual_seed(0)
    q = make("cosine").eval()
    z = feature_map(scale=5.0)
    with torch.no_grad():
        out = q(z)
    unit_z = torch.nn.functional.normalize(z, dim=1)
    codebook = q.vq.codebook
    assert torch.equal(out.indices, torch.einsum("bdhw,kd->bhwk", unit_z, codebook).argmax(-1))
    torch.testing.assert_close(out.quantized.norm(dim=1), torch.ones(2, 4, 4))
    assert float(out.quant_error) < 4.0  # measured on the sphere, not against the raw |z| ~ 5 sqrt(D)


def test_cosine_codebook_moves_by_ema_and_stays_on_the_sphere():
    torch.manual_seed(0)
    q = make("cosine").train()
    before = q.vq.codebook.clone()
    q(feature_map())
    assert not torch.equal(before, q.vq.codebook)
    torch.testing.assert_close(q.vq.codebook.norm(dim=1), torch.ones(K))
    assert not any(p.requires_grad and p.shape == (K, D) for p in q.parameters())  # no learnable codebook


# --- simvq ----------------------------------------------------------------------------------------------------

def test_simvq_base_codebook_stays_frozen_while_its_linear_map_learns():
    torch.manual_seed(0)
    images = smooth_images(n=2)
    model = tiny_model("simvq")
    sim = model.quantizer.sim
    frozen, weight = sim.frozen_codebook.clone(), sim.code_transform.weight.detach().clone()
    assert all(p is not sim.frozen_codebook for p in model.autoencoder_parameters())
    standard_step(context(model, images), images)
    assert torch.equal(sim.frozen_codebook, frozen)
    assert not torch.equal(sim.code_transform.weight, weight)
    torch.testing.assert_close(model.quantizer.export_codebook(), frozen @ sim.code_transform.weight.t())


# --- cvq ------------------------------------------------------------------------------------------------------

def test_cvq_kmeans_initializes_once_on_the_first_training_batch():
    torch.manual_seed(0)
    q = make("cvq", usage_decay=0.0, dead_threshold=-1.0)  # re-anchoring off: only the k-means step acts
    z = feature_map(b=4, scale=3.0)
    initial = q.codebook.weight.detach().clone()
    q.train()(z)
    centroids = q.codebook.weight.detach().clone()
    assert bool(q.initialized) and not torch.equal(initial, centroids)
    # k-means centroids sit among the data: each lies nearer to its batch than the tiny initial codes did
    rows = z.permute(0, 2, 3, 1).reshape(-1, D)
    assert torch.cdist(centroids, rows).min(1).values.mean() < torch.cdist(initial, rows).min(1).values.mean()
    q(feature_map(seed=9, b=4, scale=3.0))
    assert torch.equal(q.codebook.weight, centroids)  # not re-initialized on the next batch
    # nor after a restore into a fresh adapter
    fresh = make("cvq", usage_decay=0.0, dead_threshold=-1.0)
    fresh.load_state_dict(q.state_dict())
    fresh.train()(z)
    assert torch.equal(fresh.codebook.weight, centroids)


def test_cvq_reanchors_a_code_that_went_unused():
    torch.manual_seed(0)
    q = make("cvq", kmeans_init=False).train()
    z = feature_map(b=4)
    with torch.no_grad():
        q.codebook.weight[3] = 100.0  # never the nearest code
    q(z)
    rows = z.permute(0, 2, 3, 1).reshape(-1, D)
    code = q.codebook.weight[3].detach()
    # pulled (a = exp(-1e-3)) onto the batch feature closest to it
    assert torch.cdist(code[None], rows).min() < 0.5
    assert int(q.usage.nonzero().numel()) > 0 and float(q.usage[3]) == 0.0


def test_cvq_hard_threshold_replaces_only_dead_codes():
    torch.manual_seed(0)
    q = make("cvq", kmeans_init=False, dead_threshold=0.03).train()
    z = feature_map(b=4)
    with torch.no_grad():
        q.codebook.weight[3] = 100.0
    before = q.codebook.weight.detach().clone()
    out = q(z)
    used = torch.zeros(K, dtype=torch.bool)
    used[out.indices.unique()] = True
    rows = z.permute(0, 2, 3, 1).reshape(-1, D)
    assert torch.equal(q.codebook.weight[used], before[used])  # used codes: untouched
    dead_codes = q.codebook.weight[~used].detach()
    assert (dead_codes[:, None] == rows[None]).all(-1).any(1).all()  # dead codes: now batch features exactly
    assert int(out.diagnostics["reanchored_codes"]) == int((~used).sum())


def test_cvq_randomness_comes_from_the_global_rng():
    def run(seed):
        torch.manual_seed(seed)
        q = make("cvq", anchor="random", usage_decay=0.0, dead_threshold=-1.0)
        q.train()(feature_map(b=4))
        return q.codebook.weight.detach().clone()
    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))


# --- affine ---------------------------------------------------------------------------------------------------

def test_affine_parameters_receive_gradients_and_move_at_the_multiplied_rate():
    torch.manual_seed(0)
    images = smooth_images(n=2)
    model = tiny_model("affine", lr_multiplier=10.0)
    q = model.quantizer
    ctx = context(model, images)
    loss, _ = model.task_loss(images)
    loss.backward()
    for p in (q.scale_raw, q.shift_raw, q.base_codebook):
        assert p.grad is not None and p.grad.abs().sum() > 0
    ctx.optimizer.zero_grad()
    standard_step(ctx, images)
    # Adam's first step moves each raw parameter by lr (gradient sign), so scale and shift move by 10 * lr
    moved = q.scale_raw.grad.abs() > 1e-6
    torch.testing.assert_close((q.scale - 1).abs()[moved], torch.full((int(moved.sum()),), 10 * 1e-3),
                               rtol=1e-3, atol=0)
    assert (q.shift.abs() > 5e-3).any()


def test_affine_synchronized_update_sends_the_decoder_gradient_to_the_codes():
    torch.manual_seed(0)
    z, upstream = feature_map().requires_grad_(), feature_map(seed=5)
    grads, values = [], []
    for nu in (0.0, 0.5):
        torch.manual_seed(0)
        q = make("affine", sync_nu=nu, codebook_weight=0.0, commitment_weight=0.0).train()
        out = q(z)
        values.append(out.quantized.detach())
        g = torch.autograd.grad((out.quantized * upstream).sum(), q.base_codebook, allow_unused=True)[0]
        grads.append(torch.zeros(K, D) if g is None else g)
    assert torch.equal(values[0], values[1])  # the same decoder input
    assert grads[0].abs().max() == 0 and grads[1].abs().max() > 0


# --- the registry ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", METHODS)
def test_every_method_is_registered_with_its_effective_codebook_size(name):
    q = make(name)
    assert q.codebook_size == K and q.dim == D
    with pytest.raises(MethodError, match="has no option"):
        make(name, no_such_option=1)
