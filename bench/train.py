"""Train one RunSpec to one record. Read top to bottom: setup, the loop, the final evaluation.

The loop is the same for every method. The one place a method changes it is
`model.quantizer.training_step(ctx, images)`, the update-rule hook of methods/base.py (the default is
loss = reconstruction + aux loss, backward, optimizer step; MQ replaces it with its bi-level step).

A Trainer is its own checkpoint: calling it again after a crash, a kill or a SLURM requeue resumes from
the last checkpoint in its work directory, and calling it when the record exists does nothing.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from bench import UserError
from bench.datasets import IndexStream, load_dataset
from bench.environment import environment, peak_memory_mb, reset_peak_memory
from bench.evaluation import evaluate_test
from bench.metrics import evaluate_split, mean_batch_perplexity
from bench.models import build_model
from bench.records import write_record
from bench.spec import RunSpec
from methods import TrainContext
from methods.schedules import warmup_cosine

TRAIN_STREAM, EXTRA_STREAM = 0, 1  # the harness's batches, and the method's further batches (MQ's outer)
LOG_EVERY = 10  # progress-bar refreshes; each one syncs the host with the device


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but torch sees no GPU; pass --device cpu or auto")
    return torch.device(name)


def autocast_for(spec: RunSpec, device: torch.device):
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else None, "off": None,
             "bf16": torch.bfloat16, "fp16": torch.float16}[spec.amp]
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


class Trainer:
    def __init__(self, spec: RunSpec, out_dir: str | Path, scratch_dir: str | Path, progress: bool = True):
        self.spec = spec
        self.out_dir, self.scratch_dir = Path(out_dir), Path(scratch_dir)
        self.progress = progress
        self.fid_extractor = None  # tests inject a random-weight network here; its numbers are not FID

    @property
    def run_id(self) -> str:
        return self.spec.run_id()

    @property
    def record_path(self) -> Path:
        return self.out_dir / self.spec.experiment / f"{self.run_id}.json"

    @property
    def checkpoint_path(self) -> Path:
        return self.scratch_dir / self.spec.experiment / self.run_id / "checkpoint.pt"

    def __call__(self) -> Path:
        if self.record_path.exists():
            return self.record_path
        self.setup()
        self.train(self.spec.steps)
        return self.finish()

    def checkpoint(self, *args, **kwargs):
        """submitit calls this on preemption or timeout: requeue a fresh Trainer, which resumes from the last
        checkpoint on disk (saving here, from a signal handler mid-step, could capture half a step)."""
        import submitit

        return submitit.helpers.DelayedSubmission(Trainer(self.spec, self.out_dir, self.scratch_dir, progress=False))

    # --- setup ------------------------------------------------------------------------------------------

    def setup(self) -> None:
        spec = self.spec
        spec.validate()
        self.started = time.perf_counter()
        self.device = resolve_device(spec.device)
        if spec.threads:
            torch.set_num_threads(spec.threads)
        # On the CPU, the backward of tensor indexing (codebook[idx], inside vector-quantize-pytorch) accumulates
        # in a thread-dependent order unless deterministic algorithms are on; there the deterministic kernel is
        # also the faster one (0.6 ms against 1.7 ms for 8192 rows). On a GPU it would cost speed: left off.
        torch.use_deterministic_algorithms(self.device.type == "cpu", warn_only=True)
        reset_peak_memory(self.device)
        self.data = load_dataset(spec.dataset, spec.data_root, spec.download).to(self.device)
        torch.manual_seed(spec.seed)
        self.model = build_model(spec).to(self.device)
        self.quantizer = self.model.quantizer
        self.model.setup_training(spec.steps)
        self.quantizer.setup_training(spec.steps)
        self.optimizer = torch.optim.AdamW(
            self.model.autoencoder_parameters(), lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay
        )
        self.autocast = autocast_for(spec, self.device)
        self.train_stream = IndexStream(len(self.data.train), spec.batch_size, spec.seed, TRAIN_STREAM, self.device)
        self.extra_stream = IndexStream(len(self.data.train), spec.batch_size, spec.seed, EXTRA_STREAM, self.device)
        self.ctx = TrainContext(
            model=self.model, loss_fn=self.loss_fn, optimizer=self.optimizer, draw_batch=self.draw_extra_batch,
            total_steps=spec.steps, autocast=self.autocast,
        )
        self.step, self.extra_position, self.train_seconds, self.previous_wall, self.resumes = 0, 0, 0.0, 0.0, 0
        self.curves: list[dict] = []
        if self.checkpoint_path.exists():
            self.load_checkpoint()

    def loss_fn(self, images):
        with self.autocast():
            return self.model.task_loss(images)

    def draw_extra_batch(self):
        images = self.data.train[self.extra_stream(self.extra_position)]
        self.extra_position += 1
        self.prefetch(self.extra_stream, self.extra_position)
        return images

    def prefetch(self, stream: IndexStream, position: int) -> None:
        """Datasets streamed from disk start decoding a coming batch now; in-memory ones need nothing."""
        prefetch = getattr(self.data.train, "prefetch", None)
        if prefetch is not None:
            prefetch(stream(position))

    # --- the loop ---------------------------------------------------------------------------------------

    def train(self, until: int) -> None:
        spec, model = self.spec, self.model
        model.train()
        bar = tqdm(total=until, initial=self.step, desc=self.run_id, disable=not self.progress,
                   dynamic_ncols=True, leave=False)
        segment_start = time.perf_counter()
        while self.step < until:
            for group in self.optimizer.param_groups:
                group["lr"] = spec.lr * warmup_cosine(self.step, spec.warmup_steps, spec.steps)
            images = self.data.train[self.train_stream(self.step)]
            self.prefetch(self.train_stream, self.step + 1)
            self.ctx.step = self.step
            model.before_step(self.step)
            result = self.quantizer.training_step(self.ctx, images)  # the method's update rule
            model.after_step(images)  # the model's own step (VQGAN's discriminator), whatever the method
            self.step += 1
            bar.update(1)
            if self.progress and (self.step % LOG_EVERY == 0 or self.step == until):
                bar.set_postfix(loss=f"{result.loss.item():.4f}",
                                batch_ppl=f"{mean_batch_perplexity(result.output.indices, self.quantizer.codebook_size):.1f}")
            evaluate_now = self.step == spec.steps or (spec.eval_every and self.step % spec.eval_every == 0)
            checkpoint_now = self.step == spec.steps or (spec.ckpt_every and self.step % spec.ckpt_every == 0)
            if evaluate_now or checkpoint_now:
                self.train_seconds += self.elapsed_since(segment_start)
                if evaluate_now:
                    self.curves.append(self.validate())
                if checkpoint_now:
                    self.save_checkpoint()
                segment_start = time.perf_counter()
        self.train_seconds += self.elapsed_since(segment_start)
        bar.close()

    def elapsed_since(self, start: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def validate(self) -> dict:
        result = evaluate_split(self.model, self.data.val, self.quantizer.codebook_size,
                                self.spec.eval_batch_size, self.autocast)
        m = result.metrics
        return {"step": self.step, "train_s": round(self.train_seconds, 3), "mse": m["mse"],
                "perplexity": m["perplexity"], "usage": m["usage"]}

    # --- checkpoints ------------------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        state = {
            "spec": self.spec.to_dict(),
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "method": self.quantizer.training_state(),
            "model_training": self.model.training_state(),
            "extra_position": self.extra_position,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
            "curves": self.curves,
            "train_seconds": self.train_seconds,
            "wall_seconds": self.previous_wall + time.perf_counter() - self.started,
            "resumes": self.resumes,
        }
        path = self.checkpoint_path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)  # a kill mid-save leaves the previous checkpoint intact

    def load_checkpoint(self) -> None:
        path = self.checkpoint_path
        try:
            state = torch.load(path, map_location=self.device, weights_only=False)
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.quantizer.load_training_state(state["method"])
            self.model.load_training_state(state["model_training"])
        except Exception as error:
            raise UserError(f"checkpoint {path} is corrupt or unusable ({type(error).__name__}: {error}); "
                            f"delete it to start this run over: rm {path}") from None
        self.step, self.extra_position = state["step"], state["extra_position"]
        self.curves, self.train_seconds = state["curves"], state["train_seconds"]
        self.previous_wall = state["wall_seconds"]
        self.resumes = state["resumes"] + 1
        torch.set_rng_state(state["rng_cpu"].cpu())
        if state["rng_cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all([s.cpu() for s in state["rng_cuda"]])

    @property
    def samples_path(self) -> Path:
        return self.record_path.with_suffix(".samples.npz")

    def save_samples(self, reconstructions: torch.Tensor, count: int = 8) -> None:
        """Test images spread over the split and their reconstructions, beside the record, for the figures."""
        import io

        import numpy as np

        picks = torch.linspace(0, len(reconstructions) - 1, count).round().long()
        buffer = io.BytesIO()
        np.savez_compressed(buffer, original=self.data.test[picks.to(self.data.test.device)].cpu().numpy(),
                            reconstruction=reconstructions[picks].numpy())
        self.samples_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.samples_path.with_suffix(".tmp")
        tmp.write_bytes(buffer.getvalue())
        os.replace(tmp, self.samples_path)  # written before the record: a record always has its samples

    # --- the record -------------------------------------------------------------------------------------

    def finish(self) -> Path:
        spec = self.spec
        eval_start = time.perf_counter()
        metrics, null_reasons, eval_info = evaluate_test(self.model, self.data, spec, self.autocast, self.fid_extractor)
        eval_seconds = time.perf_counter() - eval_start
        self.save_samples(eval_info.pop("reconstructions"))
        count = lambda params: sum(p.numel() for p in params)  # noqa: E731
        cost = {
            "wall_s": self.previous_wall + time.perf_counter() - self.started,
            "train_s": self.train_seconds,
            "train_images_per_s": spec.steps * spec.batch_size / max(self.train_seconds, 1e-9),
            "eval_s": eval_seconds,
            "resumes": self.resumes,
            "peak_mem_mb": peak_memory_mb(self.device),
            "params_autoencoder": count(self.model.autoencoder_parameters()),
            "params_method": count(self.quantizer.method_parameters()),
            "params_total": count(self.model.parameters()),
        }
        record = {
            "experiment": spec.experiment,
            "run_id": self.run_id,
            "spec": spec.to_dict(),
            "metrics": metrics,
            "cost": cost,
            "null_reasons": null_reasons,
            "curves": self.curves,
            "env": {**environment(self.device), "codebook_size": self.quantizer.codebook_size,
                    "export": self.quantizer.export_note(), "model_note": self.model.record_note(), **eval_info},
        }
        write_record(self.record_path, record)
        return self.record_path
