"""The update-rule hook: a method that replaces the training step gets the context the contract promises."""
import torch

from bench.datasets import IndexStream, load_dataset
from bench.train import EXTRA_STREAM, TRAIN_STREAM, Trainer
from methods import register, standard_step
from methods.ste import StraightThroughVQ
from tests.conftest import tiny_spec

CALLS = []


@register("test-hook")
class RecordingVQ(StraightThroughVQ):
    """STE that logs what its hook sees and draws one further batch every second step."""

    def training_step(self, ctx, images):
        extra = ctx.draw_batch() if ctx.step % 2 == 0 else None
        CALLS.append((ctx.step, ctx.total_steps, images.clone(), None if extra is None else extra.clone()))
        return standard_step(ctx, images)


def test_hook_replaces_the_step_and_gets_context_and_extra_batches(tmp_path):
    CALLS.clear()
    spec = tiny_spec(method="test-hook", steps=6)
    Trainer(spec, tmp_path / "out", tmp_path / "runs", progress=False)()
    assert [c[0] for c in CALLS] == list(range(6)) and {c[1] for c in CALLS} == {6}
    train = load_dataset("photos").train
    main_stream = IndexStream(len(train), spec.batch_size, spec.seed, TRAIN_STREAM)
    extra_stream = IndexStream(len(train), spec.batch_size, spec.seed, EXTRA_STREAM)
    for step, _, images, extra in CALLS:
        assert torch.equal(images, train[main_stream(step)])
        if extra is not None:
            assert torch.equal(extra, train[extra_stream(step // 2)])  # its own stream, its own position


def test_extra_stream_position_survives_a_checkpoint(tmp_path):
    CALLS.clear()
    spec = tiny_spec(method="test-hook", steps=6, ckpt_every=3)
    first = Trainer(spec, tmp_path / "out", tmp_path / "runs", progress=False)
    first.setup()
    first.train(3)  # stops after the checkpoint at step 3, as a killed job would
    CALLS.clear()
    Trainer(spec, tmp_path / "out", tmp_path / "runs", progress=False)()
    assert [c[0] for c in CALLS] == [3, 4, 5]
    train = load_dataset("photos").train
    extra_stream = IndexStream(len(train), spec.batch_size, spec.seed, EXTRA_STREAM)
    assert torch.equal(CALLS[1][3], train[extra_stream(2)])  # step 4 draws the third extra batch
