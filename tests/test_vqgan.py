"""VQGAN: encoder/decoder shapes, LPIPS, the discriminator's warm-up, the adaptive weight, resume, every method."""
import json

import pytest
import torch

from bench import UserError
from bench.datasets import DATASETS, DatasetInfo, ImageSplits
from bench.metrics import PROTOCOL_METRICS
from bench.models import build_model
from bench.models.perceptual import LPIPS, VGG16_STAGES, bundled_heads
from bench.models.vqgan import VQGANModel, adaptive_weight, vqgan_options
from bench.spec import RunSpec, load_preset
from bench.train import Trainer
from methods import list_methods
from tests.conftest import run_cli

# f4 on 16x16 images (4x4 latents), 16-32 channels: a training step takes a few milliseconds without LPIPS
TINY_VQGAN = {"ch": 16, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [4], "z_channels": 16,
              "norm_groups": 8, "perceptual_weight": 0.0, "disc_layers": 2, "disc_channels": 16, "disc_start": 0.5}
METHODS = [m for m in ("ste", "ema", "mq") if m in list_methods()]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny ops run fastest on one thread


@pytest.fixture
def tiny_data(monkeypatch):
    """A 16x16 dataset registered for in-process runs: smooth random images, 64 / 16 / 16."""
    def load(data_root=None, download=False):
        g = torch.Generator().manual_seed(0)
        coarse = torch.rand(96, 3, 4, 4, generator=g)
        images = torch.nn.functional.interpolate(coarse, size=16, mode="bilinear", align_corners=False)
        images = (images * 255).round().to(torch.uint8)
        return ImageSplits("tiny16", images[:64], images[64:80], images[80:])

    monkeypatch.setitem(DATASETS, "tiny16", DatasetInfo("tiny16", load, image_size=16))
    return "tiny16"


def vqgan_spec(dataset, method="ste", steps=6, **options):
    return RunSpec(method=method, dataset=dataset, model="vqgan", code_dim=8, codebook_size=32, batch_size=8,
                   steps=steps, warmup_steps=2, eval_every=0, ckpt_every=0, eval_batch_size=1000, lr=1e-3,
                   model_options={**TINY_VQGAN, **options})


def trainer(spec, tmp_path, name="a"):
    return Trainer(spec, tmp_path / name / "out", tmp_path / name / "runs", progress=False)


def disc_params(model):
    return [p.detach().clone() for p in model.discriminator.parameters()]


# --- architecture -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ch_mult, factor", [([1, 1, 2, 2, 4], 16), ([1, 2, 2, 4], 8)])
def test_downsampling_factor_is_two_to_the_levels_minus_one(ch_mult, factor):
    torch.manual_seed(0)
    spec = vqgan_spec("photos", ch_mult=ch_mult, attn_resolutions=[2], resolution=32)
    model = build_model(spec)
    z = model.encode(torch.zeros(2, 3, 32, 32))
    assert z.shape == (2, 8, 32 // factor, 32 // factor)
    assert model.decode(torch.zeros_like(z)).shape == (2, 3, 32, 32)
    attention = [m for m in model.encoder.modules() if type(m).__name__ == "AttnBlock"]
    assert len(attention) == (1 if factor == 16 else 0) + 1  # one at 2x2 (f16 only) + the middle block's


def test_bad_model_options_end_with_one_user_error():
    with pytest.raises(UserError, match="unknown vqgan model option"):
        vqgan_options(vqgan_spec("photos", chanels=3))
    with pytest.raises(UserError, match="norm_groups"):
        vqgan_options(vqgan_spec("photos", ch=12))
    with pytest.raises(UserError, match="disc_start"):
        vqgan_options(vqgan_spec("photos", disc_start=5))


# --- the perceptual network ---------------------------------------------------------------------------------------

def test_lpips_equals_torchmetrics_lpips_on_the_same_weights():
    """Same VGG16 tensors and the same bundled LPIPS heads: our taps, scaling and normalization give the
    reference implementation's distances."""
    from torchmetrics.functional.image.lpips import _LPIPS

    torch.manual_seed(0)
    reference = _LPIPS(pretrained=True, net="vgg", pnet_rand=True).eval()  # bundled heads, random VGG
    vgg = {}
    for name, tensor in reference.net.named_parameters():  # slice3.10.weight -> 10.weight (torchvision indices)
        _, index, kind = name.split(".")
        vgg[f"{index}.{kind}"] = tensor
    for stage in VGG16_STAGES:  # kaiming, as torchvision, so that deep taps carry signal
        for index, _, _ in stage:
            torch.nn.init.kaiming_normal_(vgg[f"{index}.weight"].data, mode="fan_out", nonlinearity="relu")
    heads = torch.load(bundled_heads(), map_location="cpu", weights_only=True)
    ours = LPIPS(vgg, [heads[f"lin{k}.model.1.weight"] for k in range(5)])
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    expected = reference(x, y).flatten()
    assert torch.allclose(ours(x, y), expected, rtol=1e-4, atol=1e-6)
    assert (expected > 0).all() and torch.allclose(ours(x, x), torch.zeros(3), atol=1e-6)


def test_user_given_vgg16_file_in_torchvision_format_is_loaded(tmp_path):
    g = torch.Generator().manual_seed(1)
    random = LPIPS.random(generator=g)
    state = {f"features.{i}.{kind}": getattr(random, f"conv{i}_{kind}") for stage in VGG16_STAGES
             for i, _, _ in stage for kind in ("weight", "bias")}
    torch.save(state, tmp_path / "vgg16.pth")
    loaded = LPIPS.from_files(tmp_path / "vgg16.pth")
    assert torch.equal(loaded.conv28_weight, random.conv28_weight)
    assert loaded.note["heads"].endswith("vgg.pth")
    torch.save({"features.0.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="not torchvision's VGG16"):
        LPIPS.from_files(tmp_path / "bad.pth")


def test_perceptual_weights_are_neither_parameters_nor_checkpointed():
    torch.manual_seed(0)
    model = build_model(vqgan_spec("photos", perceptual_weight=1.0, perceptual_weights_path="random"))
    assert model.perceptual is not None
    assert not any(n.startswith("perceptual") for n, _ in model.named_parameters())
    assert not any(k.startswith("perceptual") for k in model.state_dict())
    assert any(k.startswith("discriminator") for k in model.state_dict())  # the discriminator is trained: saved


def test_missing_perceptual_weights_give_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))  # no VGG16 in torch hub's cache
    with pytest.raises(UserError) as error:
        build_model(vqgan_spec("photos", perceptual_weight=1.0))
    message = str(error.value)
    assert "VGG16" in message and "perceptual_weights_path" in message and "--perceptual-weight 0" in message
    build_model(vqgan_spec("photos", perceptual_weight=0.0))  # no perceptual term: no weights needed

    result = run_cli("--methods", "ste", "--model", "vqgan", "--steps", "2", "--perceptual-weight", "1",
                     "--out", str(tmp_path / "out"), "--scratch", str(tmp_path / "runs"), "--quiet")
    assert result.returncode == 2
    assert result.stderr.count("error:") == 1 and "--perceptual-weight 0" in result.stderr
    assert "Traceback" not in result.stderr and not list((tmp_path / "out").rglob("*.json"))


# --- the adversarial terms -----------------------------------------------------------------------------------------

def test_adaptive_weight_is_the_clamped_ratio_of_gradient_norms():
    w = torch.nn.Parameter(torch.ones(4, 4))
    weight = adaptive_weight((2 * w).sum(), (0.5 * w).sum(), w)  # gradient norms 8 and 2
    assert torch.allclose(weight, torch.tensor(8 / (2 + 1e-4)))
    assert adaptive_weight((2 * w).sum(), (1e-12 * w).sum(), w).item() == 1e4  # clamped
    with torch.no_grad():
        assert adaptive_weight((2 * w).sum(), (0.5 * w).sum(), w).item() == 0.0  # no graph: nothing to balance


def test_discriminator_switches_on_at_the_warmup_fraction(tiny_data, tmp_path):
    run = trainer(vqgan_spec(tiny_data, steps=6, disc_start=0.5), tmp_path)
    run.setup()
    model = run.model
    assert isinstance(model, VQGANModel) and model.disc_start_step == 3
    before = disc_params(model)
    run.train(3)  # steps 0, 1, 2: before the warm-up ends
    assert all(torch.equal(a, b) for a, b in zip(before, disc_params(model)))
    assert "g_loss" not in model.last and "d_loss" not in model.last
    assert not model.disc_optimizer.state  # no step taken, no Adam moments
    run.train(4)  # step 3: both adversarial terms on
    assert not all(torch.equal(a, b) for a, b in zip(before, disc_params(model)))
    assert {"g_loss", "d_loss", "adaptive_weight"} <= set(model.last)
    assert torch.isfinite(model.last["adaptive_weight"]) and model.last["adaptive_weight"] > 0
    assert torch.isfinite(model.last["d_loss"])


def test_generator_loss_includes_perceptual_and_adversarial_terms_and_spares_discriminator_grads(tiny_data):
    torch.manual_seed(0)
    model = build_model(vqgan_spec(tiny_data, perceptual_weight=1.0, perceptual_weights_path="random"))
    model.setup_training(6)
    images = DATASETS[tiny_data].loader().train[:4]
    model.before_step(0)
    plain, _ = model.task_loss(images)
    assert set(model.last) == {"rec", "perceptual"} and model.last["perceptual"] > 0
    model.before_step(5)
    loss, out = model.task_loss(images)
    terms = model.last
    expected = terms["rec"] + terms["perceptual"] + out.aux_loss + 0.8 * terms["adaptive_weight"] * terms["g_loss"]
    assert torch.allclose(loss.detach(), expected.detach(), rtol=1e-5)
    assert torch.isfinite(terms["adaptive_weight"]) and terms["adaptive_weight"] > 0
    loss.backward()
    assert all(p.grad is None for p in model.discriminator.parameters())  # D's step is its own
    assert model.decoder.last_layer.grad is not None


@pytest.mark.parametrize("method", METHODS)
def test_tiny_vqgan_trains_with_every_method(method, tiny_data, tmp_path):
    run = trainer(vqgan_spec(tiny_data, method=method, steps=6), tmp_path)
    run.setup()
    start = [p.detach().clone() for p in run.model.autoencoder_parameters()]
    run.train(6)
    assert "d_loss" in run.model.last  # the discriminator trained after the method's steps
    moved = [not torch.equal(a, b.detach()) for a, b in zip(start, run.model.autoencoder_parameters())]
    assert sum(moved) > len(moved) // 2
    record = json.loads(run.finish().read_text())
    assert record["spec"]["model"] == "vqgan" and record["spec"]["method"] == method
    assert record["metrics"]["mse"] is not None and record["metrics"]["perplexity"] >= 1


def test_checkpointed_vqgan_run_resumes_to_the_same_result(tiny_data, tmp_path):
    """Killed after the step-4 checkpoint (discriminator on since step 3, with LPIPS): the resumed run's record
    equals an uninterrupted run's, bit for bit."""
    spec = vqgan_spec(tiny_data, steps=6, perceptual_weight=1.0, perceptual_weights_path="random")
    spec.ckpt_every, spec.eval_every = 2, 2
    first = trainer(spec, tmp_path, "resumed")
    first.setup()
    first.train(4)  # stops after the checkpoint at step 4, as a killed job would
    assert first.model.disc_optimizer.state  # the discriminator's Adam moments are in that checkpoint
    resumed = json.loads(trainer(spec, tmp_path, "resumed")().read_text())
    uninterrupted = json.loads(trainer(spec, tmp_path, "straight")().read_text())
    assert resumed["cost"]["resumes"] == 1 and uninterrupted["cost"]["resumes"] == 0
    assert resumed["metrics"] == uninterrupted["metrics"]
    strip = lambda curves: [{k: v for k, v in c.items() if k != "train_s"} for c in curves]  # noqa: E731
    assert strip(resumed["curves"]) == strip(uninterrupted["curves"])


# --- presets and the command line ----------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["mq-ffhq-vqgan", "mq-imagenet-vqgan"])
def test_vqgan_presets_are_the_authors_f16_setting(preset):
    values = load_preset(preset)
    spec = RunSpec.from_dict({**{k: v for k, v in values.items() if k not in ("methods", "method_options")},
                              "method": "mq"})
    options = vqgan_options(spec)
    assert spec.model == "vqgan" and spec.codebook_size == 16384 and spec.code_dim == 32
    assert options["resolution"] == 256 and 2 ** (len(options["ch_mult"]) - 1) == 16
    assert values["method_options"]["mq"]["hyper_net"] == "mlp-tanh"


def test_cli_trains_vqgan_on_an_image_folder(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(48):  # 40x36 photos-to-be: resized so the shorter side is 32, centre-cropped to 32x32
        coarse = torch.rand(3, 5, 5, generator=g)
        image = torch.nn.functional.interpolate(coarse[None], size=(36, 40), mode="bilinear")[0]
        array = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(array).save(folder / f"img{i:03d}.png")
    options = {**TINY_VQGAN, "ch_mult": [1, 1, 2, 2], "attn_resolutions": [4]}
    out, scratch = tmp_path / "out", tmp_path / "runs"
    result = run_cli("--methods", ",".join(m for m in ("ste", "mq") if m in list_methods()), "--model", "vqgan",
                     "--dataset", f"imagefolder@32:{folder}", "--perceptual-weight", "0", "--steps", "50",
                     "--batch-size", "8", "--code-dim", "8", "--codebook-size", "32", "--eval-every", "25",
                     "--set", f"model_options={options!r}", "--set", "warmup_steps=5", "--set", "eval_batch_size=100",
                     "--threads", "1", "--out", str(out), "--scratch", str(scratch), "--quiet", timeout=600)
    assert result.returncode == 0, result.stderr
    records = [json.loads(p.read_text()) for p in out.rglob("*.json")]
    assert {p.parent.name for p in out.rglob("*.json")} == {"imagefolder@32-images-vqgan"}  # the experiment
    assert len(records) == (2 if "mq" in list_methods() else 1)
    for record in records:
        assert record["spec"]["model_options"]["perceptual_weight"] == 0.0
        assert set(PROTOCOL_METRICS) <= set(record["metrics"])
        for name in ("mse", "psnr", "ssim", "perplexity", "usage", "dead_codes", "quant_error"):
            assert record["metrics"][name] is not None, name
        assert all(name in record["null_reasons"] for name, v in record["metrics"].items() if v is None)
        assert record["env"]["test_images"] == 5  # 10% of 48 by name hashing
        assert [c["step"] for c in record["curves"]] == [25, 50]
