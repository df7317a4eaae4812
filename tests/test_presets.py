"""The MQ presets against the authors' setting, and the options that make it reachable.

The table AUTHORS below is written from the authors' public code (t2ance/MQVAE c717b55, on Betty 0.2.1; the
facts as the team's shared notes, MQ-AUTHORS.md, collect them), in their own units: images per micro-step, gradient
accumulation, micro-steps. A preset is checked through what a run of it actually gets (bench.run's grid, with
every default filled in), so neither a preset edit nor a changed default can drift away from it unnoticed.
"""
import dataclasses
import json
import tomllib
import typing
from importlib import resources
from pathlib import Path

import pytest
import torch
from torch import nn

from bench import UserError
from bench.models import MODELS, build_model
from bench.models.init import INITS
from bench.models.vqvae_mq import ResBlock
from bench.options import build
from bench.spec import RunSpec
from methods import TrainContext, create_method, method_options

# --- the authors' setting -----------------------------------------------------------------------------------------

HYPER = {  # the codebook problem and the quantizer, both levels (models_vq.py, arguments.py, training_vqgan.py)
    "rate": 0.1, "commitment_weight": 1.0, "codebook_weight": 1.0,  # rate_q on both levels; alpha, beta
    "outer_lr": 1e-4, "outer_momentum": 0.9, "outer_warmup": 0.1,  # SGD, warm-up ratio 0.1 then cosine
    "hypergrad": "darts", "fd_radius": 0.01,  # Betty's darts, first order, eps 0.01 / |v|
    "hypergrad_fp32": True,  # their precision: fp32 throughout
}
OPTIMIZER = {"lr": 1e-4, "betas": (0.5, 0.9), "weight_decay": 0.0, "adam_eps": 1e-7, "recon_loss": "l1",
             "warmup": 0.1}  # training_vqgan.py: AdamW(eps=1e-7)
VQVAE = {  # arguments.py defaults and models/vqvae_encoder_decoder.py; generator_type vqvae, rate_p 0
    "micro_batch": 64, "accumulation": 1, "micro_steps": 20000, "K": 16384, "d": 8,
    "hyper_net": "linear", "h": 8, "mlp_hidden": 32,
    "model": "vqvae-mq", "model_options": {"z_channels": 64, "num_res_blocks": 6, "init": "normal-0.02"},
}
VQGAN = {  # ffhq-mqgan.json, vqgan_configs/vq-f16.yaml, arguments.py (disc_start 10%, 20% on ImageNet)
    "micro_batch": 16, "accumulation": 4, "micro_steps": 200000, "K": 16384, "d": 32,
    "hyper_net": "mlp-tanh", "h": 32, "mlp_hidden": 256,
    "model": "vqgan", "model_options": {
        "ch": 128, "ch_mult": (1, 1, 2, 2, 4), "num_res_blocks": 2, "attn_resolutions": (16,), "z_channels": 256,
        "dropout": 0.0, "perceptual_weight": 1.0, "disc_weight": 0.1, "disc_layers": 3, "disc_channels": 64,
        "disc_lr": 1e-4, "disc_betas": (0.5, 0.9), "init": "normal-0.02"},
}
AUTHORS = {
    # dataset.py: CIFAR-10 and CelebA without augmentation; FFHQ resize + random crop; ImageNet + horizontal flip
    "mq-cifar10-vqvae": {**VQVAE, "dataset": "cifar10", "downsample": 4, "random_crop": None, "hflip": False},
    "mq-celeba-vqvae": {**VQVAE, "dataset": "celeba", "downsample": 8, "random_crop": None, "hflip": False},
    "mq-ffhq-vqgan": {**VQGAN, "dataset": "imagefolder@256:ffhq", "disc_start": 0.1, "random_crop": (1.0, 1.0),
                      "hflip": False},
    "mq-imagenet-vqgan": {**VQGAN, "dataset": "imagefolder@256:imagenet", "disc_start": 0.2,
                          "random_crop": (1.0, 1.0), "hflip": True},
}


def grid(preset):
    """The RunSpecs `python -m bench.run --preset NAME` runs, by method."""
    from bench.run import build_specs, parser

    return {spec.method: spec for spec in build_specs(parser().parse_args(["--preset", preset]))}


def effective_method_options(spec):
    return {**method_options(spec.method), **spec.method_options}


def effective_model_options(spec):
    return dataclasses.asdict(build(MODELS[spec.model].options, spec.model_options, "model options"))


def expected_run(authors):
    """Their micro-steps of `micro_batch` images with `accumulation` become our updates of the whole batch."""
    updates = authors["micro_steps"] // authors["accumulation"]
    return {"dataset": authors["dataset"], "model": authors["model"], "steps": updates,
            "batch_size": authors["micro_batch"] * authors["accumulation"], "lr": OPTIMIZER["lr"],
            "betas": OPTIMIZER["betas"], "weight_decay": OPTIMIZER["weight_decay"], "adam_eps": OPTIMIZER["adam_eps"],
            "random_crop": authors["random_crop"], "hflip": authors["hflip"],
            "warmup_steps": round(OPTIMIZER["warmup"] * updates), "recon_loss": OPTIMIZER["recon_loss"],
            "codebook_size": authors["K"], "code_dim": authors["d"]}


def expected_outer(authors):
    """One outer evaluation per update (their codebook problem runs once per `accumulation` micro-steps), a
    hyper-net step per `accumulation` evaluations, each on one micro-batch (None where the micro-batch is the
    whole batch)."""
    micro = authors["micro_batch"] if authors["accumulation"] > 1 else None
    return {**HYPER, "hyper_net": authors["hyper_net"], "latent_dim": authors["h"], "mlp_hidden": authors["mlp_hidden"],
            "outer_every": 1, "outer_accum": authors["accumulation"], "outer_micro_batch": micro,
            "probe_every": 10}  # ours, not theirs: how often the finite difference is measured (never the update)


@pytest.mark.parametrize("preset", sorted(AUTHORS))
def test_mq_preset_runs_the_authors_setting(preset):
    authors = AUTHORS[preset]
    specs = grid(preset)
    assert set(specs) == {"mq", "mq-alt", "ste-ln", "ste"}
    run = expected_run(authors)
    model = {**authors["model_options"], **({"disc_start": authors["disc_start"]} if "disc_start" in authors else {})}
    for method, spec in specs.items():
        assert {k: getattr(spec, k) for k in run} == run, method
        if spec.model == "vqvae-mq":
            assert spec.downsample == authors["downsample"]
        options = effective_model_options(spec)
        assert {k: options[k] for k in model} == model, method  # init normal-0.02 for every method

    outer = expected_outer(authors)
    assert effective_method_options(specs["mq"]) == outer
    alt = {k: v for k, v in outer.items() if k not in ("hypergrad", "fd_radius", "hypergrad_fp32", "probe_every")}
    # the authors' alt: the codebook a problem of its own, evaluated at every micro-step with their accumulation
    assert effective_method_options(specs["mq-alt"]) == {**alt, "schedule": "alt"}


@pytest.mark.parametrize("preset", sorted(AUTHORS))
def test_mq_preset_description_goes_through_the_six_items_and_what_is_not_theirs(preset):
    path = resources.files("bench.presets") / f"{preset}.toml"
    description = tomllib.loads(path.read_text())["description"]
    assert "The six audited items" in description
    items = description.split("The six audited items")[1]
    for item, words in enumerate(("micro", "quant_conv", "normal-0.02", "alt", "hyper-net", "model"), start=1):
        text = items.split(f"({item})")[1].split(f"({item + 1})")[0] if f"({item})" in items else ""
        assert words in text, f"{preset}: item ({item}) does not say {words!r}"
    assert "Not theirs:" in items


def test_the_vqvae_presets_leave_the_suites_vqvae_settings_alone():
    """vqvae-mq takes its shape from model_options and the RunSpec's downsample: a preset setting width,
    res_blocks or res_width would suggest a setting the model never reads."""
    for preset in ("mq-cifar10-vqvae", "mq-celeba-vqvae"):
        values = tomllib.loads((resources.files("bench.presets") / f"{preset}.toml").read_text())
        assert not {"width", "res_blocks", "res_width"} & set(values), preset


def test_bench_run_counts_the_cifar10_preset():
    from tests.conftest import run_cli

    result = run_cli("--preset", "mq-cifar10-vqvae", "--count")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "4"


def test_committed_records_keep_their_run_ids_unless_their_method_changed():
    from methods import method_version

    records = sorted((Path(__file__).parent.parent / "results" / "photos-300").glob("*.json"))
    assert records
    for path in records:
        record = json.loads(path.read_text())
        same_definition = record["env"].get("method_version", 1) == method_version(record["spec"]["method"])
        assert (RunSpec.from_dict(record["spec"]).run_id() == path.stem) == same_definition, path.name


# --- item 1: the outer micro-batch -------------------------------------------------------------------------------

def tiny(method, seed=0, **options):
    torch.manual_seed(seed)
    return build_model(RunSpec(method=method, width=16, res_blocks=1, res_width=8, code_dim=8, codebook_size=16,
                               method_options={"hyper_net": "linear", "latent_dim": 8, "outer_warmup": 0.0,
                                               **options}))


def images(count, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (size, 3, 32, 32), generator=g, dtype=torch.uint8) for _ in range(count)]


class Recorder:
    """Counts the images every task-loss call and every encoder call is handed, and what was drawn."""

    def __init__(self, model, outer):
        self.losses, self.encoded, self.draws, self.outer = [], [], [], list(outer)
        encode, self.model = model.encode, model
        model.encode = lambda x: (self.encoded.append(x.detach().clone()), encode(x))[1]

    def loss_fn(self, batch):
        self.losses.append(batch.shape[0])
        return self.model.task_loss(batch)

    def draw(self):
        self.draws.append(self.outer.pop(0))
        return self.draws[-1]


def run_steps(model, inner, outer, steps):
    recorder = Recorder(model, outer)
    optimizer = torch.optim.AdamW(model.autoencoder_parameters(), 1e-3)
    model.quantizer.setup_training(steps)
    ctx = TrainContext(model=model, loss_fn=recorder.loss_fn, optimizer=optimizer, draw_batch=recorder.draw,
                       total_steps=steps)
    for step in range(steps):
        ctx.step = step
        model.quantizer.training_step(ctx, inner[step])
    return recorder


def test_mq_outer_evaluation_uses_micro_batches_for_the_outer_loss_and_the_finite_difference():
    inner, outer = images(2), images(2, seed=2)
    model = tiny("mq", outer_every=1, outer_accum=4, outer_micro_batch=2)
    model.quantizer.measure = False  # the measurements' own encoder passes (tests/test_mq_measurements.py) aside
    rec = run_steps(model, inner, outer, 2)
    assert rec.losses == [8, 2, 8, 2]  # per step: the inner step on 8 images, the outer loss on 2
    assert [x.shape[0] for x in rec.encoded] == [8, 2, 2, 2] * 2  # inner, outer, the finite difference's two
    pre = model.preprocess
    assert torch.equal(rec.encoded[1], pre(outer[0][:2]))  # the first micro-batch of the drawn batch
    # the finite difference (at theta + eps v, then theta - eps v) runs on the last micro-batch of the step's batch
    assert all(torch.equal(x, pre(inner[0][-2:])) for x in rec.encoded[2:4])


def test_mq_outer_evaluation_without_micro_batch_uses_the_whole_batches():
    inner, outer = images(1), images(1, seed=2)
    model = tiny("mq", outer_every=1, outer_accum=4)
    model.quantizer.measure = False  # the measurements' own encoder passes aside
    rec = run_steps(model, inner, outer, 1)
    assert rec.losses == [8, 8]
    assert [x.shape[0] for x in rec.encoded] == [8, 8, 8, 8]


def test_outer_micro_batch_larger_than_the_batch_is_refused_with_the_fix():
    from methods import MethodError

    with pytest.raises(MethodError, match="outer_micro_batch=16 is larger than the batch of 8"):
        run_steps(tiny("mq", outer_every=1, outer_micro_batch=16), images(1), images(1, seed=2), 1)


# --- item 4: the authors' alt schedule ---------------------------------------------------------------------------

@pytest.mark.parametrize("schedule,outer_steps,evaluations", [("mq", 2, 8), ("alt", 8, 32)])
def test_mq_alt_schedules_count_codebook_steps_and_evaluations(schedule, outer_steps, evaluations):
    """8 updates with accumulation 4: mq's schedule evaluates once per update and steps every 4 evaluations;
    the authors' alt evaluates at each of their 4 micro-steps per update and steps once per update: 4x the
    codebook steps. Each evaluation sees one micro-batch of 2 images."""
    model = tiny("mq-alt", outer_every=1, outer_accum=4, outer_micro_batch=2, schedule=schedule)
    rec = run_steps(model, images(8), images(8, seed=2), 8)
    assert model.quantizer.outer_steps == outer_steps
    outer = [x for x in rec.encoded if x.shape[0] == 2]
    assert len(outer) == evaluations
    # mq: one draw per evaluation, 2 of its 8 images used; alt: one per update, cut into its 4 micro-batches
    assert len(rec.draws) == 8
    assert rec.losses == [8] * 8  # mq-alt never evaluates the whole task loss on the outer batch


def test_mq_alt_alt_step_is_the_mean_of_its_micro_batches_direct_gradients():
    model = tiny("mq-alt", outer_every=1, outer_accum=4, outer_micro_batch=2, schedule="alt")
    q = model.quantizer
    inner, outer = images(1), images(1, seed=2)
    expected = []
    original = q.direct_gradient

    def direct(ctx, batch):
        grads = original(ctx, batch)
        expected.append(torch.cat([g.reshape(-1) for g in grads]))
        return grads

    q.direct_gradient = direct
    run_steps(model, inner, outer, 1)
    assert len(expected) == 4 and q.outer_steps == 1
    received = torch.cat([q.outer_optimizer.state[p]["momentum_buffer"].reshape(-1) for p in q.method_parameters()])
    torch.testing.assert_close(received, torch.stack(expected).mean(0), rtol=1e-6, atol=1e-10)


def test_alt_schedule_needs_outer_every_one_and_belongs_to_mq_alt():
    from methods import MethodError

    with pytest.raises(MethodError, match="outer_every=1"):
        create_method("mq-alt", dim=8, codebook_size=16, schedule="alt", outer_every=4)
    with pytest.raises(MethodError, match="schedule"):
        create_method("mq-alt", dim=8, codebook_size=16, schedule="every-step")
    assert "schedule" not in method_options("mq")  # mq's schedule is the meta one


# --- item 5: the basis hyper-net ----------------------------------------------------------------------------------

def test_basis_hyper_net_is_a_linear_map_of_a_d_by_d_table_transposed():
    """The authors' basis: Embedding(d, d) -> Linear(d -> K) -> transposed to (K, d): C = W E^T + b 1^T."""
    d, K = 8, 32
    q = create_method("mq", dim=d, codebook_size=K, hyper_net="basis", latent_dim=d).double()
    net = q.codebook_net
    assert net.latents.shape == (d, d) and net.net.weight.shape == (K, d) and net.net.bias.shape == (K,)
    E, W, b = net.latents, net.net.weight, net.net.bias
    C = q.codebook()
    assert C.shape == (K, d)
    torch.testing.assert_close(C, W @ E.t() + b[:, None], rtol=1e-12, atol=1e-12)
    # every code minus its bias along the all-ones direction lies in the span of E's d rows: rank <= d, and
    # codes are the rows of W in the basis E (so K codes, d x d + K x (d + 1) parameters)
    assert sum(p.numel() for p in q.method_parameters()) == d * d + K * (d + 1)
    grads = torch.autograd.grad(C.pow(2).sum(), q.method_parameters())
    assert all(g.abs().sum() > 0 for g in grads)
    with pytest.raises(Exception, match="latent_dim=8"):
        create_method("mq", dim=d, codebook_size=K, hyper_net="basis", latent_dim=4)


def test_basis_hyper_net_trains_in_mq():
    model = tiny("mq", hyper_net="basis", outer_every=1)
    before = model.quantizer.export_codebook()
    run_steps(model, images(2), images(2, seed=2), 2)
    assert model.quantizer.outer_steps == 2
    assert ((model.quantizer.export_codebook() - before).norm(dim=1) > 0).all()


# --- item 3: initialization ---------------------------------------------------------------------------------------

TINY_VQGAN = {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [16], "z_channels": 32,
              "norm_groups": 8, "perceptual_weight": 0.0, "disc_layers": 3, "disc_channels": 64, "resolution": 32}
MODEL_SPECS = {
    "vqvae": dict(model="vqvae", width=64, res_blocks=2, res_width=64),
    "vqvae-mq": dict(model="vqvae-mq"),
    "vqgan": dict(model="vqgan", model_options=TINY_VQGAN),
}


def model_with_init(name, init, method="mq"):
    values = MODEL_SPECS[name]
    spec = RunSpec(method=method, code_dim=8, codebook_size=16,
                   **{**values, "model_options": {**values.get("model_options", {}), "init": init}})
    torch.manual_seed(0)
    return build_model(spec)


def layers(model, kind):
    return [m for m in model.modules() if isinstance(m, kind)]


def test_every_model_offers_the_same_init_choices():
    for name, entry in MODELS.items():
        field = {f.name: f for f in dataclasses.fields(entry.options)}["init"]
        assert field.default == "default" and typing.get_type_hints(entry.options)["init"].__args__ == INITS, name


@pytest.mark.parametrize("name", sorted(MODEL_SPECS))
def test_normal_init_draws_every_convolution_from_n_0_002_and_batchnorm_scales_from_n_1_002(name):
    model = model_with_init(name, "normal-0.02")
    convs = layers(model.encoder, nn.modules.conv._ConvNd) + layers(model.decoder, nn.modules.conv._ConvNd)
    weights = torch.cat([c.weight.detach().reshape(-1) for c in convs])
    assert abs(weights.mean().item()) < 0.02 * 4 / weights.numel() ** 0.5  # 4 standard errors
    assert abs(weights.std().item() / 0.02 - 1) < 0.02
    for conv in convs:
        if conv.weight.numel() >= 2000:  # every layer, not only the pool: 2000 draws pin the std within 10%
            assert abs(conv.weight.std().item() / 0.02 - 1) < 0.1, conv
    norms = layers(model.encoder, nn.BatchNorm2d) + layers(model.decoder, nn.BatchNorm2d)
    if norms:
        scales = torch.cat([n.weight.detach() for n in norms])
        assert abs(scales.mean().item() - 1) < 0.02 * 4 / scales.numel() ** 0.5
        assert abs(scales.std().item() / 0.02 - 1) < 0.15
        assert all(not n.bias.any() for n in norms)

    # for one seed, the scheme changes those and nothing else: convolution biases, GroupNorm and LayerNorm, the
    # quantizer's own layers and the discriminator are as PyTorch's (or the discriminator's own) init left them
    default = model_with_init(name, "default")
    redrawn = set()
    for part in ("encoder", "decoder"):
        for prefix, m in getattr(model, part).named_modules():
            if isinstance(m, nn.modules.conv._ConvNd):
                redrawn.add(f"{part}.{prefix}.weight")
            elif isinstance(m, nn.BatchNorm2d):
                redrawn.add(f"{part}.{prefix}.weight")  # its bias: 0 under both schemes
    theirs = default.state_dict()
    assert redrawn <= set(theirs)
    for key, ours in model.state_dict().items():
        assert torch.equal(ours, theirs[key]) != (key in redrawn), key


def test_default_init_is_pytorchs_and_the_discriminator_is_always_dcgan_initialized():
    model = model_with_init("vqgan", "default")
    convs = [m for m in model.encoder.modules() if isinstance(m, nn.Conv2d)]
    stds = [c.weight.std().item() for c in convs if c.weight.numel() >= 2000]
    assert max(stds) / min(stds) > 1.5  # PyTorch's default scales with the fan-in; N(0, 0.02) would not
    disc = model.discriminator
    weights = torch.cat([c.weight.detach().reshape(-1) for c in layers(disc, nn.Conv2d)])
    assert abs(weights.std().item() / 0.02 - 1) < 0.02
    scales = torch.cat([n.weight.detach() for n in layers(disc, nn.BatchNorm2d)])
    assert abs(scales.mean().item() - 1) < 0.01 and all(not n.bias.any() for n in layers(disc, nn.BatchNorm2d))


# --- item 6: the authors' VQ-VAE ------------------------------------------------------------------------------------

def describe(module):
    """A module's layers in order: (kind, in, out, kernel, stride) for convolutions, ('bn', channels),
    ('relu',) and ('res', width) for a residual block."""
    out = []
    for m in module.net:
        if isinstance(m, ResBlock):
            out.append(("res", m.block[1].in_channels))
        elif isinstance(m, nn.ConvTranspose2d):
            out.append(("convT", m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0]))
        elif isinstance(m, nn.Conv2d):
            out.append(("conv", m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0]))
        elif isinstance(m, nn.BatchNorm2d):
            out.append(("bn", m.num_features))
        elif isinstance(m, nn.ReLU):
            out.append(("relu",))
        else:
            raise AssertionError(f"unexpected layer {m}")
    return out


def authors_vqvae(z, d, factor):
    """models/vqvae_encoder_decoder.py with models_vq.py's quant_conv and post_quant_conv, written out."""
    encoder = [("conv", 3, z // 2, 4, 2), ("bn", z // 2), ("relu",), ("conv", z // 2, z, 4, 2), ("bn", z), ("relu",)]
    if factor == 8:
        encoder += [("conv", z, z, 4, 2), ("bn", z), ("relu",)]
    encoder += [("conv", z, z, 3, 1)] + [("res", z)] * 6 + [("conv", z, d, 1, 1)]
    decoder = [("conv", d, z, 1, 1)] + [("res", z)] * 6 + [("convT", z, z, 3, 1)]
    if factor == 8:
        decoder += [("bn", z), ("relu",), ("convT", z, z, 4, 2)]
    decoder += [("bn", z), ("relu",), ("convT", z, z // 2, 4, 2), ("bn", z // 2), ("relu",), ("convT", z // 2, 3, 4, 2)]
    return encoder, decoder


@pytest.mark.parametrize("factor,size,grid_size", [(4, 32, 8), (8, 128, 16)])
def test_vqvae_mq_is_the_authors_vqvae(factor, size, grid_size):
    spec = RunSpec(method="ste-ln", model="vqvae-mq", downsample=factor, code_dim=8, codebook_size=16)
    torch.manual_seed(0)
    model = build_model(spec)
    encoder, decoder = authors_vqvae(64, 8, factor)
    assert describe(model.encoder) == encoder and describe(model.decoder) == decoder
    block = model.encoder.net[-2].block  # ReLU-Conv3x3-BN-ReLU-Conv1x1-BN, residual
    assert [type(m) for m in block] == [nn.ReLU, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d, nn.BatchNorm2d]
    assert [block[1].kernel_size, block[4].kernel_size] == [(3, 3), (1, 1)]
    x = model.preprocess(torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8))
    z = model.encode(x)
    assert z.shape == (2, 8, grid_size, grid_size)
    recon, out = model(x)
    assert recon.shape == x.shape and out.indices.shape == (2, grid_size, grid_size)


def test_vqvae_mq_refuses_factors_the_authors_do_not_have():
    with pytest.raises(UserError, match="4 or 8"):
        build_model(RunSpec(method="ste", model="vqvae-mq", downsample=2))
