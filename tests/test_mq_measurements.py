"""MQ's measurements of its finite difference (issue 18): flip_fraction, darts_norm, direct_norm, jvp_norm,
darts_vs_jvp, checked against independent definitions (a deep copy of the model, its parameters perturbed by
hand, torch.cdist's nearest codes, autograd and torch.func.jvp), and shown not to change training, to survive a
training_state round trip, and to be the global batch's under data parallelism (2 gloo ranks)."""
from __future__ import annotations

import copy
import io
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from torch import nn

from bench.models import VQModel, build_model
from bench.spec import RunSpec
from methods import MethodError, TrainContext, collective, create_method
from tests.conftest import ROOT
from tests.formulas import CallWith

# the default fd_radius: with the codes spread over the encoder's outputs (spread_codes), about a sixth of the tiny
# model's 256 inner rows change code within theta +- eps v, some at + only, some at - only (checked below: the
# test must tell these apart)
RADIUS = 0.01

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: fastest, and exactly reproducible, on one thread


def tiny_model(method="mq", seed=0, model="vqvae", **options):
    torch.manual_seed(seed)
    extra = dict(model_options={"z_channels": 8, "num_res_blocks": 1}) if model == "vqvae-mq" else {}
    options = {"hyper_net": "linear", "latent_dim": 8, **options}
    net = build_model(RunSpec(method=method, model=model, width=16, res_blocks=1, res_width=8, code_dim=8,
                              codebook_size=16, method_options=options, **extra))
    net.double()
    net.preprocess = lambda images: VQModel.preprocess(images).double()
    return spread_codes(net)


def spread_codes(model):
    """At initialization every row of the tiny encoder's output is nearest to one and the same code (its rows
    differ by about 0.1, the codes by about 1): the linear hyper-net's codes are moved and shrunk onto the rows
    of a batch, C = E (0.1 W)^T + b with b centring them on the rows' mean, so that all 16 codes are used."""
    q = model.quantizer
    with torch.no_grad():
        y = q.pre(model.encode(model.preprocess(batches(1)[0])))
        net = q.codebook_net.net
        net.weight.mul_(0.1)
        net.bias.copy_(y.mean((0, 2, 3)) - (q.codebook_net.latents @ net.weight.t()).mean(0))
    return model


def batches(count, seed=1, size=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (size, 3, 32, 32), generator=g, dtype=torch.uint8) for _ in range(count)]


def context(model, draw, total_steps=100):
    optimizer = torch.optim.AdamW(model.autoencoder_parameters(), 1e-3)
    collective.average_gradients_before_step(optimizer)  # several ranks: the global batch's gradient
    model.quantizer.setup_training(total_steps)
    return TrainContext(model=model, loss_fn=model.task_loss, optimizer=optimizer, draw_batch=draw,
                        total_steps=total_steps)


class Stream:
    def __init__(self, items, position=0):
        self.items, self.position = items, position

    def __call__(self):
        item = self.items[self.position]
        self.position += 1
        return item


def train(ctx, inner, start, stop, after_outer=None):
    q = ctx.model.quantizer
    for step in range(start, stop):
        ctx.step = step
        before = q.evaluations
        q.training_step(ctx, inner[step])
        if after_outer is not None and q.evaluations != before:
            after_outer()


# --- the definitions, independently ------------------------------------------------------------------------------

def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def reference(model, inner, outer, radius):
    """Every measured quantity of one outer evaluation of `model` (left untouched: the work is on a copy), from
    the definitions: v = grad_theta L_outer, eps = radius / |v|; codes k(t) = argmin_k |y_i(theta + t v) - C_k|
    by torch.cdist, y = LN(encoder(x)); grad_phi L_inner(t) = grad_phi rate cb mean |C_k(t) - y(t)|^2;
    darts = [grad(-eps) - grad(+eps)] / (2 eps); jvp = grad_phi (2 rate cb / (N d)) sum_i C_{k_i(0)} . (J_y v)_i
    with J_y v by torch.func.jvp."""
    m = copy.deepcopy(model)
    q = m.quantizer
    phi_names = [n for n, _ in m.named_parameters() if n.startswith("quantizer.codebook_net.")]
    theta_names = [n for n, p in m.named_parameters() if n not in phi_names and p.requires_grad]
    params = dict(m.named_parameters())
    theta, phi = [params[n] for n in theta_names], [params[n] for n in phi_names]
    loss, _ = m.task_loss(outer)
    grads = torch.autograd.grad(loss, theta + phi)
    v, direct = grads[:len(theta)], flat(grads[len(theta):])
    eps = radius / flat(v).norm()
    base = [p.detach().clone() for p in theta]
    x = m.preprocess(inner)
    rate_cb = q.rate * q.codebook_weight

    def codebook():
        return q.codebook_net.net(q.codebook_net.latents)  # the linear hyper-net, C = E W^T + b

    def search_input():
        z = m.encoder(x)
        y = nn.functional.layer_norm(z.permute(0, 2, 3, 1), (z.shape[1],), q.pre.norm.weight, q.pre.norm.bias,
                                     q.pre.norm.eps)
        return y.reshape(-1, z.shape[1])

    def at(t):
        with torch.no_grad():
            for p, b, d in zip(theta, base, v):
                p.copy_(b + t * d)
            y = search_input()
            for p, b in zip(theta, base):
                p.copy_(b)
        c = codebook()
        k = torch.cdist(y, c.detach()).argmin(1)
        grad = flat(torch.autograd.grad(rate_cb * ((c[k] - y) ** 2).mean(), phi))
        return k, grad, y

    k0, _, y0 = at(0.0)
    k_plus, g_plus, _ = at(eps)
    k_minus, g_minus, _ = at(-eps)
    darts = (g_minus - g_plus) / (2 * eps)

    wrapper = CallWith(m, lambda inputs: search_input())
    values = tuple(p.detach() for p in theta)

    def y_of(*thetas):
        return torch.func.functional_call(wrapper, {f"model.{n}": t for n, t in zip(theta_names, thetas)},
                                          (x,), strict=False)

    _, jv = torch.func.jvp(y_of, values, tuple(d.detach() for d in v))
    c = codebook()
    jvp = flat(torch.autograd.grad(2 * rate_cb / y0.numel() * (c[k0] * jv).sum(), phi))
    flips = ((k_plus != k0) | (k_minus != k0)).double().mean().item()
    return {"flip_fraction": flips, "darts_norm": darts.norm().item(), "direct_norm": direct.norm().item(),
            "jvp_norm": jvp.norm().item(), "darts_vs_jvp": ((darts - jvp).norm() / jvp.norm()).item(),
            # what a wrong definition would give, so the test can require that it differs from the right one
            "plus_only": (k_plus != k0).double().mean().item(), "minus_only": (k_minus != k0).double().mean().item(),
            "plus_vs_minus": (k_plus != k_minus).double().mean().item(),
            "first_parameter": [g.norm().item() for g in darts.split([p.numel() for p in phi])],
            "darts_vs_darts_norm": ((darts - jvp).norm() / darts.norm()).item()}


# --- one evaluation against the definitions --------------------------------------------------------------------

@pytest.mark.parametrize("hypergrad", ["darts", "jvp"])
def test_one_evaluation_measures_what_the_definitions_give(hypergrad):
    model = tiny_model(hypergrad=hypergrad, fd_radius=RADIUS, probe_every=1)
    inner, outer = batches(1)[0], batches(1, seed=2)[0]
    expected = reference(model, inner, outer, RADIUS)
    ctx = context(model, lambda: outer)
    model.quantizer.outer_gradient(ctx, inner)
    got = model.quantizer.run_stats()

    assert got.pop("evaluations") == 1 and got.pop("probes") == 1
    assert set(got) == {"flip_fraction", "darts_norm", "direct_norm", "jvp_norm", "darts_vs_jvp"}
    for key, value in got.items():
        assert value == pytest.approx(expected[key], rel=1e-9, abs=1e-15), key
    # the test tells a right definition from the near misses: some rows flip at + only, some at - only, the
    # fraction is neither the + flips, the - flips nor the rows whose two codes differ; every parameter of the
    # hyper-net carries part of the norm; |darts - jvp| is relative to |jvp|, not to |darts|
    assert 0.05 < expected["flip_fraction"] < 0.95
    others = (expected["plus_only"], expected["minus_only"], expected["plus_vs_minus"])
    assert all(abs(other - expected["flip_fraction"]) * 256 >= 1 for other in others[:2]), others
    assert all(part > 1e-3 * expected["darts_norm"] for part in expected["first_parameter"])
    assert len(expected["first_parameter"]) == 3
    assert abs(expected["darts_vs_jvp"] / expected["darts_vs_darts_norm"] - 1) > 1e-3
    assert expected["darts_vs_jvp"] > 1e-3  # the flips make darts differ from jvp


def test_at_a_small_radius_darts_is_jvp_and_nothing_flips():
    model = tiny_model(fd_radius=1e-6, probe_every=1)
    inner, outer = batches(1)[0], batches(1, seed=2)[0]
    expected = reference(model, inner, outer, 1e-6)
    ctx = context(model, lambda: outer)
    model.quantizer.outer_gradient(ctx, inner)
    got = model.quantizer.run_stats()
    assert got["flip_fraction"] == expected["flip_fraction"] == 0.0
    # both about 1e-10 (float64 rounding over the radius 1e-6), against 0.4 at the default radius
    assert got["darts_vs_jvp"] < 1e-8 and expected["darts_vs_jvp"] < 1e-8


def test_a_row_whose_code_moves_the_same_way_at_both_ends_counts_as_flipped():
    """The flip fraction and the norms from given codes and gradients (no probe: nothing else runs). Rows 1, 2
    and 7 change code at one end, rows 3 and 6 at both, to the same new code: 5 of 8, where + alone gives 3,
    - alone 4 and "the two ends disagree" 3."""
    q = create_method("mq", dim=8, codebook_size=16, hyper_net="linear", latent_dim=8, probe_every=0).double()
    q.setup_training(10)
    center = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    plus = torch.tensor([0, 2, 0, 3, 1, 1, 5, 1])
    minus = torch.tensor([0, 0, 4, 3, 1, 1, 5, 6])
    g = torch.Generator().manual_seed(3)
    direct, term = ([torch.randn(p.shape, generator=g, dtype=p.dtype) for p in q.method_parameters()]
                    for _ in range(2))
    q.measure_evaluation(None, None, None, direct, term, (center, plus, minus))
    got = q.run_stats()
    assert got["flip_fraction"] == 5 / 8
    assert got["darts_norm"] == pytest.approx(flat(term).norm().item(), rel=1e-12)
    assert got["direct_norm"] == pytest.approx(flat(direct).norm().item(), rel=1e-12)
    assert len(direct) == 3 and all(t.norm() > 0.1 * flat(direct).norm() for t in direct)


def test_mq_alt_records_its_direct_gradient_norm_alone():
    model = tiny_model("mq-alt")
    inner, outer = batches(1)[0], batches(1, seed=2)[0]
    expected = reference(model, inner, outer, 0.01)
    ctx = context(model, lambda: outer)
    model.quantizer.outer_gradient(ctx, inner)
    got = model.quantizer.run_stats()
    assert got == {"direct_norm": pytest.approx(expected["direct_norm"], rel=1e-9), "evaluations": 1.0}


# --- the schedule, the means and the state ------------------------------------------------------------------------

def test_probes_every_probe_every_evaluations_and_the_means_are_the_per_evaluation_means():
    """outer_every 1, outer_accum 2: 7 evaluations (not 7 hyper-net steps), probed at evaluations 0, 3, 6. A run
    probing every evaluation measures the same values (measuring changes nothing), so its per-evaluation
    interval_stats give the values the sparser run averages."""
    inner, outer = batches(7), batches(7, seed=2)
    options = dict(outer_every=1, outer_accum=2, fd_radius=RADIUS)
    dense_model, sparse_model = tiny_model(probe_every=1, **options), tiny_model(probe_every=3, **options)
    dense, sparse = context(dense_model, Stream(outer)), context(sparse_model, Stream(outer))
    per_evaluation = []
    train(dense, inner, 0, 7, after_outer=lambda: per_evaluation.append(dense_model.quantizer.interval_stats()))
    train(sparse, inner, 0, 7)
    assert dense_model.quantizer.interval_stats() == {}  # reset by each call
    assert len(per_evaluation) == 7 and sparse_model.quantizer.outer_steps == 3

    got = sparse_model.quantizer.run_stats()
    assert got.pop("evaluations") == 7 and got.pop("probes") == 3
    for key, value in got.items():
        rows = per_evaluation[::3] if key in ("jvp_norm", "darts_vs_jvp") else per_evaluation
        assert value == pytest.approx(sum(r[key] for r in rows) / len(rows), rel=1e-12), key
    dense_stats = dense_model.quantizer.run_stats()
    assert dense_stats["probes"] == 7
    assert dense_stats["jvp_norm"] == pytest.approx(sum(r["jvp_norm"] for r in per_evaluation) / 7, rel=1e-12)


def test_probe_every_zero_never_probes_and_the_option_is_checked():
    model = tiny_model(probe_every=0)
    outer = batches(1, seed=2)[0]
    model.quantizer.outer_gradient(context(model, lambda: outer), batches(1)[0])
    assert set(model.quantizer.run_stats()) == {"flip_fraction", "darts_norm", "direct_norm", "evaluations", "probes"}
    model = tiny_model(probe_every=0, hypergrad="jvp")
    model.quantizer.outer_gradient(context(model, lambda: outer), batches(1)[0])
    assert set(model.quantizer.run_stats()) == {"jvp_norm", "direct_norm", "evaluations", "probes"}
    for bad in (-1, True, 2.0):
        with pytest.raises(MethodError, match="probe_every"):
            create_method("mq", dim=8, codebook_size=16, probe_every=bad)


def test_measurements_off_or_before_any_evaluation_report_nothing():
    model = tiny_model()
    model.quantizer.setup_training(10)
    assert model.quantizer.run_stats() == {} and model.quantizer.interval_stats() == {}
    assert create_method("ste", dim=8, codebook_size=16).run_stats() == {}  # the base class's default
    model.quantizer.measure = False
    outer = batches(1, seed=2)[0]
    model.quantizer.outer_gradient(context(model, lambda: outer), batches(1)[0])
    assert model.quantizer.run_stats() == {}


def with_dropout(model):
    """The encoder behind a dropout: its forward passes draw random numbers (the extra passes must not)."""
    model.encoder = nn.Sequential(nn.Dropout(0.1), model.encoder)
    return model


@pytest.mark.parametrize("method,options", [("mq", {"hypergrad": "darts"}), ("mq", {"hypergrad": "jvp"}),
                                            ("mq-alt", {}), ("mq-alt", {"schedule": "alt", "outer_every": 1})])
def test_measuring_changes_nothing_in_training(method, options):
    """Every measurement on (every evaluation probed) against none: the same parameters, BatchNorm statistics,
    optimizer states and random number generator afterwards, bit for bit. The model has BatchNorm (its running
    statistics move at every training-mode forward) and a dropout before the encoder (every forward draws)."""
    inner, outer = batches(6), batches(12, seed=2)
    if method == "mq":
        options = {**options, "probe_every": 1, "fd_radius": RADIUS}
    states = []
    for measure in (True, False):
        model = with_dropout(tiny_model(method, model="vqvae-mq", **{"outer_every": 2, **options}))
        model.quantizer.measure = measure
        ctx = context(model, Stream(outer), total_steps=6)
        torch.manual_seed(7)
        train(ctx, inner, 0, 6)
        q = model.quantizer
        assert (q.evaluations > 0) == measure
        states.append({"model": model.state_dict(), "optimizer": ctx.optimizer.state_dict()["state"],
                       "outer": q.outer_optimizer.state_dict()["state"], "rng": torch.get_rng_state(),
                       "position": ctx.draw_batch.position})
    measured, plain = states
    assert measured["position"] == plain["position"]
    assert any("running_mean" in name for name in measured["model"])
    for name, tensor in measured["model"].items():
        assert torch.equal(tensor, plain["model"][name]), name
    for key in ("optimizer", "outer"):
        for index, state in measured[key].items():
            for name, tensor in state.items():
                assert torch.equal(tensor, plain[key][index][name]), (key, index, name)
    assert torch.equal(measured["rng"], plain["rng"])


def round_trip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("hypergrad", ["darts", "jvp"])
def test_a_resumed_run_measures_what_an_uninterrupted_one_does(hypergrad):
    """Stopped after step 5, between two validation points (interval_stats at steps 3 and 9) and between two
    probes; resumed from training_state and the model's own state into a differently initialized model."""
    inner, outer = batches(9), batches(9, seed=2)
    options = dict(hypergrad=hypergrad, outer_every=1, outer_accum=2, probe_every=2, fd_radius=RADIUS)

    model = tiny_model(**options)
    ctx = context(model, Stream(outer), total_steps=9)
    train(ctx, inner, 0, 3)
    first_interval = model.quantizer.interval_stats()
    train(ctx, inner, 3, 9)
    uninterrupted = (first_interval, model.quantizer.interval_stats(), model.quantizer.run_stats())

    stopped = tiny_model(**options)
    stream = Stream(outer)
    stopped_ctx = context(stopped, stream, total_steps=9)
    train(stopped_ctx, inner, 0, 3)
    resumed_first = stopped.quantizer.interval_stats()
    train(stopped_ctx, inner, 3, 5)
    state = round_trip({"model": stopped.state_dict(), "optimizer": stopped_ctx.optimizer.state_dict(),
                        "method": stopped.quantizer.training_state(), "position": stream.position})
    resumed = tiny_model(seed=123, **options)
    resumed_ctx = context(resumed, Stream(outer, state["position"]), total_steps=9)
    resumed.load_state_dict(state["model"])
    resumed_ctx.optimizer.load_state_dict(state["optimizer"])
    resumed.quantizer.load_training_state(state["method"])
    train(resumed_ctx, inner, 5, 9)
    again = (resumed_first, resumed.quantizer.interval_stats(), resumed.quantizer.run_stats())

    assert again == uninterrupted  # floats compared exactly
    assert uninterrupted[2]["evaluations"] == 9 and uninterrupted[2]["probes"] == 5
    assert len(uninterrupted[1]) == len(uninterrupted[2]) - 2  # every key measured in the second interval


def test_a_checkpoint_from_before_the_measurements_still_loads():
    model = tiny_model()
    outer = batches(1, seed=2)[0]
    model.quantizer.outer_gradient(context(model, lambda: outer), batches(1)[0])
    state = model.quantizer.training_state()
    del state["measurements"]
    model.quantizer.load_training_state(state)
    assert model.quantizer.run_stats() == {}


# --- data parallelism: 2 gloo ranks measure the global batch ----------------------------------------------------

DP_RUNS = {"darts": dict(hypergrad="darts"), "jvp": dict(hypergrad="jvp"), "alt": {}}


def dp_stats(rank: int, world: int) -> dict:
    """Each run's run_stats after 4 steps on this rank's slice of global batches of 4 images."""
    torch.set_num_threads(1)
    inner, outer = batches(4), batches(4, seed=2)
    rows = slice(rank * 4 // world, (rank + 1) * 4 // world)
    stats = {}
    for name, options in DP_RUNS.items():
        method = "mq-alt" if name == "alt" else "mq"
        extra = dict(probe_every=1, fd_radius=RADIUS) if method == "mq" else {}
        model = tiny_model(method, outer_every=2, **options, **extra)
        ctx = context(model, Stream([b[rows] for b in outer]), total_steps=4)
        train(ctx, [b[rows] for b in inner], 0, 4)
        stats[name] = model.quantizer.run_stats()
    return stats


def dp_worker(path: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        stats = dp_stats(dist.get_rank(), dist.get_world_size())
        with open(f"{path}.{dist.get_rank()}", "w") as f:
            json.dump(stats, f)
    finally:
        dist.destroy_process_group()


def test_two_ranks_measure_the_global_batch(tmp_path, one_thread):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("import sys; sys.path.insert(0, {root!r}); from tests.test_mq_measurements import dp_worker; "
            "dp_worker({path!r})").format(root=str(ROOT), path=str(tmp_path / "stats"))
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "RANK": str(rank), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
             for rank in range(2)]
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    for rank, proc in enumerate(procs):
        assert proc.returncode == 0, f"rank {rank} failed:\n{outputs[rank][-4000:]}"
    ranks = [json.loads((tmp_path / f"stats.{rank}").read_text()) for rank in range(2)]
    single = dp_stats(0, 1)
    assert set(single["darts"]) == set(single["jvp"]) == {"flip_fraction", "darts_norm", "direct_norm", "jvp_norm",
                                                           "darts_vs_jvp", "evaluations", "probes"}
    assert 0 < single["darts"]["flip_fraction"] < 1
    for got in ranks:
        assert got.keys() == single.keys()
        for name, expected in single.items():
            assert got[name].keys() == expected.keys(), name
            for key, value in expected.items():
                assert got[name][key] == pytest.approx(value, rel=1e-9), (name, key)
