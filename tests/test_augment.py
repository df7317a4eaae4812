"""Training-time augmentation: seeded per (seed, stream, step, row), training batches only, resumable exactly."""
import numpy as np
import pytest
import torch

from bench.datasets.augment import Augmentation, augment_batch, crop_box, draws
from bench.train import Trainer
from tests.conftest import TINY, tiny_spec
from tests.resume import killed_and_resumed_metrics

AUGMENT = Augmentation(random_crop=(0.5, 0.9), hflip=True)


def batch(seed=0, size=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (8, 3, size, size), generator=g, dtype=torch.uint8)


def test_the_same_seed_and_step_give_the_same_batch_and_another_step_another():
    images = batch()
    first = augment_batch(images, draws(AUGMENT, seed=3, stream=0, position=5, rows=8))
    again = augment_batch(images, draws(AUGMENT, seed=3, stream=0, position=5, rows=8))
    assert torch.equal(first, again)
    for other in (dict(seed=4, stream=0, position=5), dict(seed=3, stream=1, position=5),
                  dict(seed=3, stream=0, position=6)):
        assert not torch.equal(first, augment_batch(images, draws(AUGMENT, rows=8, **other)))


def test_a_crop_is_the_square_it_says_resized_back_and_a_flip_mirrors():
    images = batch(size=8)
    d = draws(Augmentation(random_crop=(0.5, 0.5), hflip=True), seed=0, stream=0, position=0, rows=8)
    out = augment_batch(images, d)
    for i in range(8):
        side, x, y, flip = d.row(i)
        left, top, right, bottom = crop_box(8, 8, side, x, y)
        assert right - left == bottom - top == 4
        crop = images[i:i + 1, :, top:bottom, left:right].float()
        expected = torch.nn.functional.interpolate(crop, size=(8, 8), mode="bilinear", antialias=True,
                                                   align_corners=False).round().clamp(0, 255).to(torch.uint8)[0]
        assert torch.equal(out[i], expected.flip(-1) if flip else expected)
    assert 0 < int(d.flip.sum()) < 8  # about half mirrored


def test_flip_only_mirrors_exactly_the_drawn_rows():
    images = batch()
    d = draws(Augmentation(hflip=True), seed=1, stream=0, position=0, rows=8)
    out = augment_batch(images, d)
    for i in range(8):
        assert torch.equal(out[i], images[i].flip(-1) if d.flip[i] else images[i])


def test_decode_time_crops_take_the_square_from_the_resized_image(tmp_path):
    from PIL import Image

    from bench.datasets.files import resize_center_crop

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (20, 40, 3), dtype=np.uint8))  # 40 wide, 20 high
    assert np.array_equal(resize_center_crop(image, 10, draw=(1.0, 0.0, 0.0, False)),
                          np.asarray(image.resize((20, 10), Image.Resampling.BICUBIC))[:, :10].transpose(2, 0, 1))
    right = resize_center_crop(image, 10, draw=(1.0, 1.0, 0.0, True))  # the right end, mirrored
    resized = np.asarray(image.resize((20, 10), Image.Resampling.BICUBIC))
    assert np.array_equal(right, resized[:, 10:][:, ::-1].transpose(2, 0, 1))


def test_training_batches_are_augmented_and_validation_is_not(tmp_path):
    plain = Trainer(tiny_spec(steps=1), tmp_path, tmp_path, progress=False)
    augmented = Trainer(tiny_spec(steps=1, random_crop=(0.6, 0.9), hflip=True), tmp_path, tmp_path, progress=False)
    with plain, augmented:
        plain.setup()
        augmented.setup()
        assert torch.equal(plain.batch(plain.train_stream, 0), plain.data.train[plain.train_stream(0)])
        assert not torch.equal(augmented.batch(augmented.train_stream, 0), plain.batch(plain.train_stream, 0))
        assert not torch.equal(augmented.draw_extra_batch(), plain.draw_extra_batch())  # MQ's outer batches too
        assert plain.validate() == augmented.validate()  # same initial model, validation images untouched


def test_augmentation_enters_the_run_id_and_the_default_does_not():
    assert tiny_spec(hflip=True).run_id() != tiny_spec().run_id()
    assert tiny_spec(random_crop=(0.8, 1.0)).run_id() != tiny_spec().run_id()
    values = tiny_spec().to_dict()
    for added in ("random_crop", "hflip", "adam_eps"):
        values.pop(added)
    from bench.spec import RunSpec

    assert RunSpec.from_dict(values).run_id() == tiny_spec().run_id()  # a record made before they existed


def test_a_killed_and_resumed_augmented_run_ends_bit_identical(tmp_path):
    extra = [*TINY, "--set", "random_crop=0.5,1", "--hflip"]
    resumed, uninterrupted, _ = killed_and_resumed_metrics("ste", tmp_path, extra=extra)
    assert resumed == uninterrupted
