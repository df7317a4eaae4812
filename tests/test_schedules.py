"""Every schedule of the suite, table-driven at its key steps: first, end of warm-up, middle, last, past the end.

The expected values are numbers or closed forms written here, never the schedule function itself: the harness's
learning rate (read from its optimizer during a short run), the stage-2 prior's (floor 0.1), MQ's outer rate
(warm-up from zero), VQGAN's discriminator (start step and ramp) and Gumbel's temperature (three shapes).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from bench.datasets import DATASETS, DatasetInfo, ImageSplits
from bench.models import build_model
from bench.prior import PriorConfig, train_prior
from bench.spec import RunSpec
from bench.train import Trainer
from methods import create_method
from methods.gumbel import annealed_temperature
from methods.schedules import warmup_cosine
from tests.conftest import tiny_spec

COS_QUARTER = 0.5 * (1 + math.cos(math.pi / 4))  # 0.8536: a quarter of the way down a cosine from 1 to 0


def cosine_down(progress: float) -> float:
    """1 at progress 0, 0 at progress 1: half a cosine period."""
    return 0.5 * (1 + math.cos(math.pi * progress))


# --- the one warm-up-then-cosine shape ----------------------------------------------------------------------

@pytest.mark.parametrize("step, warmup, total, floor, from_zero, expected", [
    (0, 10, 110, 0.0, False, 0.1),  # first step already moves: (0 + 1) / 10
    (4, 10, 110, 0.0, False, 0.5),
    (9, 10, 110, 0.0, False, 1.0),  # end of warm-up
    (10, 10, 110, 0.0, False, 1.0),  # the cosine starts at 1
    (35, 10, 110, 0.0, False, COS_QUARTER),
    (60, 10, 110, 0.0, False, 0.5),  # middle of the decay
    (109, 10, 110, 0.0, False, cosine_down(0.99)),  # last step of the run
    (110, 10, 110, 0.0, False, 0.0),
    (500, 10, 110, 0.0, False, 0.0),  # past the end: held at the floor
    (0, 4, 104, 0.1, False, 0.25),  # the floor does not touch the warm-up
    (54, 4, 104, 0.1, False, 0.55),  # 0.1 + 0.9 * 0.5
    (104, 4, 104, 0.1, False, 0.1),
    (900, 4, 104, 0.1, False, 0.1),
    (0, 10, 110, 0.0, True, 0.0),  # MQ's outer rate: warm-up from zero
    (5, 10, 110, 0.0, True, 0.5),
    (10, 10, 110, 0.0, True, 1.0),
    (0, 0, 100, 0.0, False, 1.0),  # no warm-up
    (50, 0, 100, 0.0, False, 0.5),
])
def test_warmup_cosine_at_its_key_steps(step, warmup, total, floor, from_zero, expected):
    assert warmup_cosine(step, warmup, total, floor=floor, warmup_from_zero=from_zero) == pytest.approx(
        expected, abs=1e-12)


# --- the harness's learning rate, read from its optimizer ---------------------------------------------------------

class LearningRates:
    """Records the first parameter group's lr of every AdamW step taken while installed (a global hook)."""

    def __init__(self):
        self.seen: list[float] = []

    def __enter__(self):
        def hook(optimizer, args, kwargs):
            if isinstance(optimizer, torch.optim.AdamW):
                self.seen.append(optimizer.param_groups[0]["lr"])

        self.handle = register_optimizer_step_pre_hook(hook)
        return self.seen

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.fixture
def tiny32(monkeypatch):
    """A small 32x32 dataset for in-process runs (random images, 64 / 16 / 16)."""
    def load(data_root=None, download=False):
        images = torch.randint(0, 256, (96, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        return ImageSplits("tiny32", images[:64], images[64:80], images[80:])

    monkeypatch.setitem(DATASETS, "tiny32", DatasetInfo("tiny32", load, image_size=32))
    return "tiny32"


def test_harness_lr_per_step_is_linear_warmup_then_cosine(tiny32, tmp_path, one_thread):
    """warmup_steps = 2 of 6 steps, lr 1e-3: (1/2, 2/2) lr, then cosine over the remaining 4 steps."""
    spec = tiny_spec(dataset=tiny32, steps=6, warmup_steps=2, lr=1e-3, eval_every=0, ckpt_every=0)
    with LearningRates() as seen:
        Trainer(spec, tmp_path / "out", tmp_path / "runs", progress=False)()
    expected = [0.5, 1.0, 1.0, COS_QUARTER, 0.5, 1 - COS_QUARTER]
    assert seen == pytest.approx([1e-3 * f for f in expected], rel=1e-12)


def test_prior_lr_per_step_decays_to_a_floor_of_a_tenth(one_thread):
    config = PriorConfig(layers=1, heads=1, width=16, dropout=0.0, steps=6, batch_size=4, warmup_steps=2, lr=1e-3)
    grids = torch.randint(0, 8, (16, 2, 2), generator=torch.Generator().manual_seed(0))
    with LearningRates() as seen:
        train_prior(grids, 8, config, "cpu")
    expected = [0.5, 1.0, 1.0, 0.1 + 0.9 * COS_QUARTER, 0.55, 0.1 + 0.9 * (1 - COS_QUARTER)]
    assert seen == pytest.approx([1e-3 * f for f in expected], rel=1e-12)


# --- MQ's outer rate ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("step, factor", [
    (0, 0.0), (5, 0.5), (9, 0.9), (10, 1.0), (55, 0.5), (99, cosine_down(89 / 90)), (100, 0.0), (150, 0.0),
])
def test_mq_outer_rate_warms_up_from_zero_over_a_tenth_then_decays_to_zero(step, factor):
    q = create_method("mq", dim=8, codebook_size=16, outer_lr=2e-3)  # outer_warmup=0.1 by default
    q.setup_training(100)
    assert q.outer_lr_at(step) == pytest.approx(2e-3 * factor, abs=1e-15)


def test_mq_outer_rate_without_a_run_length_is_constant():
    q = create_method("mq", dim=8, codebook_size=16, outer_lr=2e-3)
    assert q.outer_lr_at(0) == q.outer_lr_at(1000) == 2e-3


# --- Gumbel's temperature ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule, expected", [
    # steps 0, 25, 50, 100 (the end) and 150 (past it) of 100, from 1 to 1/16
    ("exp", [1.0, 0.5, 0.25, 1 / 16, 1 / 16]),  # geometric: (1/16)^(step/100)
    ("linear", [1.0, 0.765625, 0.53125, 1 / 16, 1 / 16]),
    ("cosine", [1.0, 1 / 16 + 15 / 16 * COS_QUARTER, 0.53125, 1 / 16, 1 / 16]),
])
def test_gumbel_temperature_at_its_key_steps(schedule, expected):
    got = [annealed_temperature(step, 100, 1.0, 1 / 16, schedule) for step in (0, 25, 50, 100, 150)]
    assert got == pytest.approx(expected, rel=1e-12)
    q = create_method("gumbel", dim=8, codebook_size=16, schedule=schedule)  # defaults: 1 -> 1/16
    assert [q.temperature_at(step, 100) for step in (0, 25, 50, 100, 150)] == pytest.approx(expected, rel=1e-12)


# --- VQGAN's discriminator -------------------------------------------------------------------------------------------

def tiny_vqgan(**options):
    torch.manual_seed(0)
    model_options = {"ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "z_channels": 8,
                     "norm_groups": 8, "perceptual_weight": 0.0, "disc_layers": 1, "disc_channels": 8,
                     "resolution": 16, **options}
    return build_model(RunSpec(method="ste", model="vqgan", code_dim=8, codebook_size=16, warmup_steps=2,
                               lr=1e-3, model_options=model_options))


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_discriminator_starts_at_its_fraction_and_ramps_by_its_schedule(schedule, one_thread):
    """disc_start 0.3 of 10 steps: off for steps 0-2, on from step 3. Its lr (the run's, 1e-3): constant, or a
    warm-up over warmup_steps = 2 of its own steps then cosine to 0 over the remaining 10 - 3 - 2."""
    model = tiny_vqgan(disc_start=0.3, disc_schedule=schedule)
    model.setup_training(10)
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    on, rates = [], []
    for step in range(10):
        model.before_step(step)
        on.append(model.adversarial)
        model.after_step(images)
        rates.append(model.disc_optimizer.param_groups[0]["lr"] if model.adversarial else None)
    assert on == [False] * 3 + [True] * 7
    if schedule == "constant":
        expected = [1.0] * 7
    else:
        expected = [0.5, 1.0] + [cosine_down(j / 5) for j in range(5)]
    assert rates[3:] == pytest.approx([1e-3 * f for f in expected], rel=1e-12)
    assert len(model.disc_optimizer.state) > 0  # it took its steps
