"""Meta-Quantization (`mq`, `mq-alt`): hypergradients, the bi-level step, export and checkpoint state."""
import copy
import io
import json

import pytest
import torch

from bench.models import VQModel, build_model
from bench.spec import RunSpec
from methods import MethodError, TrainContext, create_method
from torch import nn
from tests.formulas import CallWith


def tiny_model(method="mq", seed=0, double=False, **options):
    torch.manual_seed(seed)
    model = build_model(RunSpec(method=method, width=16, res_blocks=1, res_width=8, code_dim=8, codebook_size=16,
                                method_options=options))
    if double:
        model.double()
        model.preprocess = lambda images: VQModel.preprocess(images).double()  # uint8 -> float64, not float32
    return model


def batches(count, seed=1, size=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (size, 3, 32, 32), generator=g, dtype=torch.uint8) for _ in range(count)]


class Stream:
    """A stand-in for the harness's seeded extra stream: a fixed list of batches and a position."""

    def __init__(self, items, position=0):
        self.items, self.position = items, position

    def __call__(self):
        item = self.items[self.position]
        self.position += 1
        return item


def context(model, draw, total_steps=100):
    optimizer = torch.optim.AdamW(model.autoencoder_parameters(), 1e-3)
    model.quantizer.setup_training(total_steps)
    return TrainContext(model=model, loss_fn=model.task_loss, optimizer=optimizer, draw_batch=draw,
                        total_steps=total_steps)


def train(ctx, inner, start, stop):
    for step in range(start, stop):
        ctx.step = step
        ctx.model.quantizer.training_step(ctx, inner[step])


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


# --- the hypergradient ----------------------------------------------------------------------------------------

def smooth_(module):
    """Every ReLU of `module` replaced by SiLU, in place. The error bounds below are Taylor's: they need
    grad_phi L_inner to be smooth along v, and a ReLU whose input changes sign within the radius makes the
    finite difference's error O(delta) instead of O(delta^2) (it does for some seeds)."""
    for name, child in module.named_children():
        if isinstance(child, nn.ReLU):
            setattr(module, name, nn.SiLU())
        else:
            smooth_(child)
    return module


def darts_setup():
    """Float64 tiny model (smooth encoder) with a linear hyper-net, an inner batch and v = grad_theta L_outer."""
    model = tiny_model(double=True, hyper_net="linear", latent_dim=8)
    smooth_(model.encoder)
    inner, outer = batches(2)
    ctx = context(model, Stream([outer]))
    q = model.quantizer
    theta = q.theta(ctx)
    loss, _ = model.task_loss(outer)
    v = list(torch.autograd.grad(loss, theta))
    return model, ctx, inner, theta, v


def indices_at(model, ctx, images):
    q = model.quantizer
    with torch.no_grad():
        return q(model.encode(model.preprocess(images))).indices


def move(theta, direction, scale):
    with torch.no_grad():
        torch._foreach_add_(theta, torch._foreach_mul(direction, scale))


def restore(theta, saved):
    with torch.no_grad():
        torch._foreach_copy_(theta, saved)


def test_darts_term_is_the_central_difference_of_the_quantizers_own_codebook_gradient():
    """Against the definition, through the quantizer's forward (its aux loss) rather than MQ's (K, d) form of
    the codebook term: [grad_phi aux(theta - eps v) - grad_phi aux(theta + eps v)] / (2 eps)."""
    model, ctx, inner, theta, v = darts_setup()
    q = model.quantizer
    saved = [p.detach().clone() for p in theta]
    eps = q.fd_radius / flat(v).norm()

    def phi_gradient_at(scale):
        move(theta, v, scale)
        aux = q(model.encode(model.preprocess(inner))).aux_loss
        grads = torch.autograd.grad(aux, q.method_parameters())
        restore(theta, saved)
        return flat(grads)

    expected = (phi_gradient_at(-eps) - phi_gradient_at(eps)) / (2 * eps)
    darts = flat(q.darts_term(ctx, inner, v))
    assert expected.norm() > 0
    assert torch.allclose(darts, expected, rtol=1e-9, atol=1e-12 * expected.norm().item())


def test_darts_equals_jvp_within_the_central_difference_error():
    model, ctx, inner, theta, v = darts_setup()
    q = model.quantizer
    saved = [p.detach().clone() for p in theta]
    unit = torch._foreach_div(v, flat(v).norm())
    exact = flat(q.jvp_term(ctx, inner, v))

    # The codes are well separated: a parameter step of the largest norm used below changes no assignment,
    # so grad_phi L_inner is a smooth function of theta along v and the comparison is meaningful.
    center = indices_at(model, ctx, inner)
    for sign in (1.0, -1.0):
        move(theta, unit, sign * 0.01)
        assert torch.equal(indices_at(model, ctx, inner), center)
        restore(theta, saved)

    # Error bound. With u = v/|v|, delta = fd_radius = eps |v| and f(t) = -grad_phi L_inner(theta + t u),
    #   darts = |v| (f(delta) - f(-delta)) / (2 delta),   jvp = |v| f'(0),
    # so by Taylor, darts - jvp = |v| (delta^2 / 6) f'''(xi) = (delta^2 / 6) J''(xi), where J(t) is the jvp
    # term at theta + t u (it equals |v| f'(t)). Rounding adds about u_mach |grad_phi L_inner| / delta, 1e-13
    # relative in float64 at delta = 1e-2, negligible. We estimate J''(0) by a central second difference and
    # allow twice the predicted truncation error.
    jvps = []
    for sign in (1.0, -1.0):
        move(theta, unit, sign * 0.01)
        jvps.append(flat(q.jvp_term(ctx, inner, v)))
        restore(theta, saved)
    curvature = (jvps[0] - 2 * exact + jvps[1]) / 0.01**2  # J''(0)

    errors = {}
    for radius in (1e-2, 1e-3):
        q.fd_radius = radius
        darts = flat(q.darts_term(ctx, inner, v))
        assert all(torch.equal(p, s) for p, s in zip(theta, saved))  # theta restored exactly
        bound = 2 * radius**2 / 6 * curvature.norm() + 1e-12 * exact.norm()
        assert (darts - exact).norm() <= bound
        if radius == 1e-2:  # the error is the predicted truncation term itself, not just below its size
            predicted = radius**2 / 6 * curvature
            assert (darts - exact - predicted).norm() < 0.2 * (darts - exact).norm()
        errors[radius] = ((darts - exact).norm() / exact.norm()).item()
    assert exact.norm() > 0 and errors[1e-3] < 1e-5  # about 2e-6 relative here
    # the discrepancy is the O(delta^2) truncation, not a missing term: it shrinks 100x for a 10x smaller delta
    assert 50 < errors[1e-2] / errors[1e-3] < 200


def test_autograd_mixed_derivative_is_zero_while_the_finite_difference_is_not():
    """Every path from phi to theta passes a stop-gradient (decoder input z + sg(e - z), commitment |z - sg(e)|,
    codebook |e - sg(z)|), so autograd's d/dtheta grad_phi L_inner is exactly zero; the finite difference sees
    the dependence of grad_phi L_inner on the value of z(theta) and is not."""
    model, ctx, inner, theta, v = darts_setup()
    q = model.quantizer
    phi = q.method_parameters()
    loss, _ = model.task_loss(inner)
    grad_phi = torch.autograd.grad(loss, phi, create_graph=True)
    assert flat(grad_phi).norm() > 0
    probe = sum((g * torch.randn_like(g)).sum() for g in grad_phi)
    mixed = torch.autograd.grad(probe, theta, allow_unused=True)
    assert all(m is None or not m.any() for m in mixed)
    assert flat(q.darts_term(ctx, inner, v)).norm() > 1e-3 * flat(grad_phi).norm()


# --- the unrolled hypergradient: a check that the stop-gradients leave autograd nothing to unroll -----------------

def unrolled_hypergradient(inner_loss, outer_loss, theta, phi, inner_lr):
    """d/d phi of outer_loss(theta - inner_lr * grad_theta inner_loss(theta, phi), phi), by autograd.

    inner_loss() evaluates the inner loss at the current theta (leaf tensors); outer_loss(updated) evaluates the
    outer loss with theta replaced by `updated`. Both depend on phi (leaf tensors) however they like.
    """
    grads = torch.autograd.grad(inner_loss(), theta, create_graph=True, allow_unused=True)
    updated = [t if g is None else t - inner_lr * g for t, g in zip(theta, grads)]
    out = torch.autograd.grad(outer_loss(updated), phi, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(phi, out)]


def unrolled_gradient(q, ctx, inner_images, outer_images):
    """d_phi L_outer(theta - lr * grad_theta L_inner(theta, phi), phi), one SGD step at the inner lr."""
    theta, phi = q.theta(ctx), q.method_parameters()
    names = {id(p): name for name, p in ctx.model.named_parameters()}
    wrapper = CallWith(ctx.model, ctx.loss_fn)
    inner_lr = ctx.optimizer.param_groups[0]["lr"]

    def outer_loss(updated):
        swapped = {f"model.{names[id(p)]}": t for p, t in zip(theta, updated)}
        return torch.func.functional_call(wrapper, swapped, (outer_images,), strict=False)[0]

    return unrolled_hypergradient(lambda: ctx.loss_fn(inner_images)[0], outer_loss, theta, phi, inner_lr)


def test_unrolled_hypergradient_equals_finite_differences_on_a_smooth_problem():
    """A stand-in with no argmin and no stop-gradient: phi does reach the inner update here."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64)
    theta = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    phi = torch.randn(4, 2, generator=g, dtype=torch.float64, requires_grad=True)
    lr = 0.3

    def inner_loss(th, ph):
        return (torch.tanh(x @ th) @ ph - y).pow(2).mean() + 0.1 * (th * th).sum() * ph.pow(2).sum()

    def outer_loss(th, ph):
        return (torch.sin(x @ th) @ ph + y).pow(2).mean()

    (hyper,) = unrolled_hypergradient(lambda: inner_loss(theta, phi), lambda upd: outer_loss(upd[0], phi),
                                      [theta], [phi], lr)

    def unrolled_outer(ph):
        th = theta.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(inner_loss(th, ph), th)
        return outer_loss(th - lr * grad, ph).item()

    numeric = torch.zeros(phi.numel(), dtype=phi.dtype)
    h = 1e-5
    for i in range(phi.numel()):
        step = torch.zeros(phi.numel(), dtype=phi.dtype)
        step[i] = h
        step = step.view_as(phi)
        numeric[i] = (unrolled_outer(phi.detach() + step) - unrolled_outer(phi.detach() - step)) / (2 * h)
    numeric = numeric.view_as(phi)
    direct = torch.autograd.grad(outer_loss(theta, phi), phi)[0]
    assert (hyper - numeric).norm() / numeric.norm() < 1e-3
    assert (direct - numeric).norm() / numeric.norm() > 1e-2  # the unroll matters here


def test_unrolled_on_the_stop_gradient_model_reduces_to_the_direct_gradient():
    model = tiny_model(double=True, hyper_net="linear", latent_dim=8)
    inner, outer = batches(2)
    ctx = context(model, Stream([outer]))
    q = model.quantizer
    lr = ctx.optimizer.param_groups[0]["lr"]
    unrolled = flat(unrolled_gradient(q, ctx, inner, outer))

    # the direct gradient at the theta of one plain SGD step
    reference = copy.deepcopy(model)
    theta = q.theta(ctx)
    loss, _ = model.task_loss(inner)
    grads = torch.autograd.grad(loss, theta)
    with torch.no_grad():
        for p, g in zip(reference.autoencoder_parameters(), grads):  # the order of ctx.optimizer's params
            p.sub_(lr * g)
    loss, _ = reference.task_loss(outer)
    direct = flat(torch.autograd.grad(loss, reference.quantizer.method_parameters()))
    assert torch.allclose(unrolled, direct, rtol=1e-10, atol=1e-14)


# --- the training step --------------------------------------------------------------------------------------------

def test_mq_alt_receives_only_its_direct_gradient():
    inner, outer = batches(3), batches(1, seed=2)
    model = tiny_model("mq-alt", hyper_net="linear", latent_dim=8, outer_every=3, outer_warmup=0.0)
    q = model.quantizer
    expected = []

    def draw():
        # at draw time theta has taken this step's inner update and phi has not moved yet
        images = outer[0]
        aux = q(model.encode(model.preprocess(images))).aux_loss
        expected.append(torch.autograd.grad(aux, q.method_parameters()))
        return images

    ctx = context(model, draw)
    train(ctx, inner, 0, 3)
    assert len(expected) == 1
    # SGD's first momentum buffer is a copy of the gradient it was handed
    received = [q.outer_optimizer.state[p]["momentum_buffer"] for p in q.method_parameters()]
    assert torch.allclose(flat(received), flat(expected[0]), rtol=1e-5, atol=1e-9)


def test_mq_hands_the_hyper_net_more_than_the_direct_gradient():
    inner, outer = batches(3), batches(1, seed=2)
    model = tiny_model("mq", hyper_net="linear", latent_dim=8, outer_every=3, outer_warmup=0.0)
    q = model.quantizer
    expected = []

    def draw():
        aux = q(model.encode(model.preprocess(outer[0]))).aux_loss
        expected.append(torch.autograd.grad(aux, q.method_parameters()))
        return outer[0]

    ctx = context(model, draw)
    train(ctx, inner, 0, 3)
    received = flat(q.outer_optimizer.state[p]["momentum_buffer"] for p in q.method_parameters())
    direct = flat(expected[0])
    assert (received - direct).norm() > 1e-3 * direct.norm()  # the meta-term is there


@pytest.mark.parametrize("hyper_net", ["linear", "mlp", "mlp-tanh"])
def test_one_outer_step_moves_every_code_and_inner_steps_move_none(hyper_net):
    inner, outer = batches(3), batches(1, seed=2)
    model = tiny_model("mq", hyper_net=hyper_net, latent_dim=8, mlp_hidden=16, outer_every=3, outer_warmup=0.0)
    q = model.quantizer
    ctx = context(model, Stream(outer))
    before = q.export_codebook()
    used = set()
    for step in range(2):  # inner steps only
        ctx.step = step
        used |= set(q.training_step(ctx, inner[step]).output.indices.unique().tolist())
        assert torch.equal(q.export_codebook(), before)
        assert all(p.grad is None for p in q.method_parameters())  # the codebook term's grads did not linger
    ctx.step = 2
    used |= set(q.training_step(ctx, inner[2]).output.indices.unique().tolist())
    assert len(used) < q.codebook_size  # some codes were never chosen ...
    moved = (q.export_codebook() - before).norm(dim=1)
    assert (moved > 0).all()  # ... and every code moved anyway
    assert q.outer_steps == 1


def test_mq_and_ste_ln_search_after_the_authors_layernorm_and_nothing_else():
    """The authors: the encoder's 1x1 quant_conv to d, then LayerNorm(d), then the search. The encoder's last
    layer is that projection; the quantizer adds the LayerNorm alone (no second 1x1 convolution), and ste-ln,
    MQ's control, adds the very same map."""
    from methods.ste import ChannelLayerNorm

    model = tiny_model(double=True, hyper_net="linear", latent_dim=8)
    control = create_method("ste-ln", dim=8, codebook_size=16).double()
    assert isinstance(model.encoder.net[-1], nn.Conv2d) and model.encoder.net[-1].kernel_size == (1, 1)
    for q in (model.quantizer, control):
        assert isinstance(q.pre, ChannelLayerNorm)
        assert [n for n, _ in q.pre.named_parameters()] == ["norm.weight", "norm.bias"]
    with torch.no_grad():
        for p in model.quantizer.pre.parameters():
            p.copy_(torch.randn_like(p))
        control.pre.load_state_dict(model.quantizer.pre.state_dict())
        z = model.encode(model.preprocess(batches(1)[0]))
        expected = torch.nn.functional.layer_norm(z.permute(0, 2, 3, 1), (8,), model.quantizer.pre.norm.weight,
                                                  model.quantizer.pre.norm.bias, 1e-5).permute(0, 3, 1, 2)
        assert torch.equal(model.quantizer.pre(z), control.pre(z))
        torch.testing.assert_close(model.quantizer.pre(z), expected, rtol=1e-12, atol=1e-12)


def test_identity_hyper_net_needs_latent_dim_equal_to_code_dim():
    with pytest.raises(MethodError, match="latent_dim=8"):
        create_method("mq", dim=8, codebook_size=16, hyper_net="identity", latent_dim=4)
    assert create_method("mq", dim=8, codebook_size=16, hyper_net="identity", latent_dim=8).codebook().shape == (16, 8)
    with pytest.raises(MethodError, match="hypergrad"):
        create_method("mq-alt", dim=8, codebook_size=16, hypergrad="jvp")


# --- export and state ---------------------------------------------------------------------------------------------

def test_exported_plain_quantizer_reproduces_indices_and_outputs_exactly():
    inner, outer = batches(4), batches(2, seed=2)
    model = tiny_model("mq", hyper_net="mlp-tanh", latent_dim=8, mlp_hidden=16, outer_every=2, outer_warmup=0.0)
    ctx = context(model, Stream(outer))
    train(ctx, inner, 0, 4)  # trained, not at its initialization
    q = model.quantizer
    plain = q.export_quantizer()
    assert torch.equal(plain.export_codebook(), q.codebook().detach())

    with torch.no_grad():
        z = model.encode(model.preprocess(inner[0]))
        ours, theirs = q(z), plain(z)
        assert torch.equal(ours.indices, theirs.indices)
        assert torch.equal(ours.quantized, theirs.quantized)
        assert torch.equal(ours.aux_loss, theirs.aux_loss)
        assert torch.equal(q.decode_indices(ours.indices), plain.decode_indices(ours.indices))
        dropped = copy.deepcopy(model)
        dropped.quantizer = plain  # the hyper-net is gone
        assert torch.equal(model(model.preprocess(inner[1]))[0], dropped(model.preprocess(inner[1]))[0])
    note = q.export_note()
    assert note["codebook_exportable"] is True and json.loads(json.dumps(note)) == note


def checkpoint(ctx, stream):
    buffer = io.BytesIO()
    torch.save({"model": ctx.model.state_dict(), "optimizer": ctx.optimizer.state_dict(),
                "method": ctx.model.quantizer.training_state(), "position": stream.position}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("method,options", [("mq", {"hypergrad": "darts"}), ("mq", {"hypergrad": "jvp"}),
                                            ("mq-alt", {})])
def test_training_state_round_trip_continues_bit_identically(method, options):
    inner, outer = batches(9), batches(5, seed=2)
    options = dict(hyper_net="mlp-tanh", latent_dim=8, mlp_hidden=16, outer_every=2, outer_accum=2, **options)

    model = tiny_model(method, **options)
    stream = Stream(outer)
    ctx = context(model, stream, total_steps=9)
    train(ctx, inner, 0, 9)

    first = tiny_model(method, **options)
    first_stream = Stream(outer)
    first_ctx = context(first, first_stream, total_steps=9)
    train(first_ctx, inner, 0, 6)  # stops mid-accumulation: one outer evaluation summed, none applied yet
    assert first.quantizer.accum_count == 1 and first.quantizer.outer_steps == 1
    state = checkpoint(first_ctx, first_stream)

    resumed = tiny_model(method, seed=123, **options)  # a different initialization, overwritten by the load
    resumed_stream = Stream(outer, state["position"])
    resumed_ctx = context(resumed, resumed_stream, total_steps=9)
    resumed.load_state_dict(state["model"])
    resumed_ctx.optimizer.load_state_dict(state["optimizer"])
    resumed.quantizer.load_training_state(state["method"])
    train(resumed_ctx, inner, 6, 9)

    assert resumed.quantizer.outer_steps == model.quantizer.outer_steps == 2
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    ours, theirs = model.quantizer.outer_optimizer.state_dict(), resumed.quantizer.outer_optimizer.state_dict()
    for key in ours["state"]:
        assert torch.equal(ours["state"][key]["momentum_buffer"], theirs["state"][key]["momentum_buffer"])


# --- in the harness -----------------------------------------------------------------------------------------------

MQ_TINY = ["--set", "mq.outer_every=3", "--set", "mq.outer_accum=2", "--set", "mq.outer_lr=0.01"]


def test_killed_mq_run_resumes_to_bit_identical_metrics(tmp_path):
    from tests.conftest import TINY
    from tests.resume import killed_and_resumed_metrics

    # checkpoints every 10 steps land between the two outer evaluations of one hyper-net update (steps 8 and 11)
    resumed, uninterrupted, died_at = killed_and_resumed_metrics("mq", tmp_path, steps=60, extra=TINY + MQ_TINY)
    assert resumed == uninterrupted  # floats compared exactly: bit for bit
    assert resumed["mse"] is not None and resumed["perplexity"] > 0


def batches_seen(method, tmp_path, **options):
    """Train a tiny run in-process and record what the task loss and the extra stream were handed."""
    from bench.train import Trainer
    from tests.conftest import tiny_spec

    spec = tiny_spec(method=method, steps=6, method_options=options)
    trainer = Trainer(spec, tmp_path / "results" / method, tmp_path / "runs" / method, progress=False)
    trainer.setup()
    losses, draws = [], []
    loss_fn, draw = trainer.ctx.loss_fn, trainer.ctx.draw_batch
    trainer.ctx.loss_fn = lambda images: (losses.append(images.clone()), loss_fn(images))[1]
    trainer.ctx.draw_batch = lambda: (draws.append(draw()), draws[-1])[1]
    trainer.train(spec.steps)
    record = trainer.finish()
    return losses, draws, json.loads(record.read_text())


def test_mq_trains_on_exactly_the_inner_batches_of_ste(tmp_path):
    ste_losses, ste_draws, _ = batches_seen("ste", tmp_path)
    mq_losses, mq_draws, record = batches_seen("mq", tmp_path, outer_every=2)
    assert len(ste_losses) == 6 and not ste_draws
    assert len(mq_draws) == 3  # after inner steps 1, 3, 5
    # the darts outer pass evaluates the task loss on each drawn batch; take those out and ste's list remains
    inner = [b for b in mq_losses if not any(torch.equal(b, d) for d in mq_draws)]
    assert len(inner) == 6 and len(mq_losses) == 9
    assert all(torch.equal(a, b) for a, b in zip(inner, ste_losses))
    assert not any(torch.equal(d, b) for d in mq_draws for b in ste_losses)  # the outer stream is its own
    assert record["env"]["export"]["codebook_exportable"] is True


def test_mq_presets_build_the_papers_latent_grids():
    from bench.spec import load_preset

    for name, size, grid in (("mq-cifar10-vqvae", 32, 8), ("mq-celeba-vqvae", 128, 16)):
        values = load_preset(name)
        options, methods = values.pop("method_options"), values.pop("methods")
        assert "mq" in methods and values["recon_loss"] == "l1"
        spec = RunSpec.from_dict({**values, "method": "mq", "method_options": options["mq"]})
        spec.validate()
        model = build_model(spec)
        with torch.no_grad():
            z = model.encode(model.preprocess(torch.zeros(1, 3, size, size, dtype=torch.uint8)))
        assert z.shape == (1, spec.code_dim, grid, grid)
        assert model.quantizer.export_codebook().shape == (spec.codebook_size, spec.code_dim)


def test_mq_alt_takes_exactly_mqs_options_less_the_hypergradient_ones_with_the_same_defaults():
    """The two registrations spell their options out (the registry reads them from the signature); this keeps
    the ablation's defaults from drifting away from the method it ablates. Its one option of its own, the
    schedule, defaults to mq's."""
    from methods.registry import method_options

    mq, alt = method_options("mq"), method_options("mq-alt")
    assert alt.pop("schedule") == "mq"
    assert {k: v for k, v in mq.items() if k not in ("hypergrad", "fd_radius", "hypergrad_fp32", "probe_every")} == alt
