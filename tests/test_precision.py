"""The precision path without a GPU: every registered method trains and evaluates through the harness under bf16
autocast on the CPU (`--amp bf16 --device cpu`), the dtype handling a GPU run exercises (vector-quantize-pytorch's
tracker has had bf16 dtype errors: lucidrains/vector-quantize-pytorch #116, #229)."""
import json
import math

import pytest
import torch

from bench.datasets import DATASETS, DatasetInfo, ImageSplits
from bench.train import Trainer
from methods import list_methods
from tests.conftest import tiny_spec

METHODS = [m for m in list_methods() if not m.startswith("test-")]
FINITE = ("mse", "psnr", "ssim", "perplexity", "usage", "dead_codes", "quant_error")


@pytest.fixture
def tiny32(monkeypatch):
    """A small 32x32 dataset for in-process runs (smooth random images, 64 / 16 / 16): seconds, not minutes."""
    def load(data_root=None, download=False):
        coarse = torch.rand(96, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        images = (torch.nn.functional.interpolate(coarse, size=32, mode="bilinear") * 255).round().to(torch.uint8)
        return ImageSplits("tiny32", images[:64], images[64:80], images[80:])

    monkeypatch.setitem(DATASETS, "tiny32", DatasetInfo("tiny32", load, image_size=32))
    return "tiny32"


@pytest.mark.parametrize("method", METHODS)
def test_bf16_autocast_run_on_the_cpu_gives_finite_metrics(method, tiny32, tmp_path, one_thread):
    # 4 steps: MQ's first outer step (outer_every = 4) runs too; K = 256 has FSQ levels and is a power of two (LFQ)
    spec = tiny_spec(method=method, dataset=tiny32, amp="bf16", device="cpu", steps=4, eval_every=0, ckpt_every=0,
                     codebook_size=256)
    trainer = Trainer(spec, tmp_path / "out", tmp_path / "runs", progress=False)
    trainer.setup()
    images = trainer.data.train[:2]
    with torch.no_grad(), trainer.autocast():
        z = trainer.model.encode(trainer.model.preprocess(images))
        out = trainer.quantizer.eval()(z)
    trainer.quantizer.train()
    assert z.dtype == torch.bfloat16  # the run really is under bf16 autocast
    assert out.indices.dtype == torch.int64
    trainer.train(spec.steps)
    record = trainer.finish()
    data = json.loads(record.read_text())
    assert data["spec"]["amp"] == "bf16"
    for name in FINITE:
        value = data["metrics"][name]
        assert value is not None and math.isfinite(value), (name, value, data["null_reasons"].get(name))
    assert all(math.isfinite(point["mse"]) for point in data["curves"])
