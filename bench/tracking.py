"""Live views of a run in TensorBoard and Weights & Biases (`--log tensorboard,wandb`, off by default).

The record stays the single source of truth; a tracker only shows, while the run trains, what the record will
hold: the training loss, learning rate and per-batch perplexity at the progress-bar cadence (values the loop
has already brought to the host), the validation curve points, the final test metrics and the reconstruction
grid. The RunSpec is the run's config and the run id its name, grouped by experiment, so a grid's runs sit
together. Only rank 0 of a multi-process run tracks.

Both packages are optional (`pip install -e ".[track]"`): asking for a tracker whose package is missing is one
clear error before training starts (`check_trackers`), never a crash mid-run.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from bench import UserError

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # name -> the package it needs


def check_trackers(names) -> None:
    """Refuse unknown tracker names and trackers whose package is not installed, before anything runs."""
    for name in names:
        if name not in TRACKERS:
            raise UserError(f"unknown --log {name!r}; valid: {', '.join(TRACKERS)}")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise UserError(f"--log {name} needs the {TRACKERS[name]} package: pip install -e \".[track]\" "
                            f"(or pip install {TRACKERS[name]})")


def image_grid(original: np.ndarray, reconstruction: np.ndarray) -> np.ndarray:
    """(N, 3, H, W) uint8 pairs -> one (2H, N*W, 3) uint8 image: originals above, reconstructions below."""
    rows = [np.concatenate(list(images.transpose(0, 2, 3, 1)), axis=1) for images in (original, reconstruction)]
    return np.concatenate(rows, axis=0)


class TensorBoardTracker:
    """Event files under `folder` (one run each): `tensorboard --logdir <scratch>/<experiment>/tensorboard`."""

    def __init__(self, folder: Path, run_id: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder))
        self.writer.add_text("spec", "\n".join(f"    {k}: {v!r}" for k, v in config.items()), 0)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def summary(self, step: int, metrics: dict) -> None:
        self.scalars(step, {f"test/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        self.writer.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run named by the run id, grouped by experiment; `WANDB_MODE=offline` and the rest of W&B's own
    environment work as usual. A resumed run continues the same W&B run (its id is the run id)."""

    def __init__(self, folder: Path, run_id: str, config: dict, group: str):
        import wandb

        folder.mkdir(parents=True, exist_ok=True)
        self.wandb = wandb
        self.run = wandb.init(project="vq-bench", name=run_id, id=run_id, group=group, config=config,
                              dir=str(folder), resume="allow", reinit="create_new")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def summary(self, step: int, metrics: dict) -> None:
        self.run.summary.update({f"test/{k}": v for k, v in metrics.items() if v is not None})

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        self.run.log({tag: self.wandb.Image(image)}, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The run's trackers, called as one; with none asked for, every call does nothing."""

    def __init__(self, names, folder: Path, run_id: str, config: dict, group: str):
        check_trackers(names)
        self.trackers = []
        for name in names:
            if name == "tensorboard":
                self.trackers.append(TensorBoardTracker(folder / "tensorboard" / run_id, run_id, config))
            else:
                self.trackers.append(WandbTracker(folder / "wandb", run_id, config, group))

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tracker in self.trackers:
            tracker.scalars(step, values)

    def summary(self, step: int, metrics: dict) -> None:
        for tracker in self.trackers:
            tracker.summary(step, metrics)

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        for tracker in self.trackers:
            tracker.image(step, tag, image)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []
