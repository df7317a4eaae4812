"""Train one RunSpec to one record. Read top to bottom: setup, the loop, the final evaluation.

The loop is the same for every method. The one place a method changes it is
`model.quantizer.training_step(ctx, images)`, the update-rule hook of methods/base.py (the default is
loss = reconstruction + aux loss, backward, optimizer step; MQ replaces it with its bi-level step).

A Trainer is its own checkpoint: calling it again after a crash, a kill, Ctrl-C or a SLURM requeue resumes from
the last checkpoint in its work directory, and calling it when the record exists does nothing. One process at a
time trains a run (a lock file per run id in the scratch folder); torch's process-wide settings (threads,
deterministic kernels) hold for the run only. A training loss that becomes non-finite ends the run early with
a record of status "diverged": in a benchmark, divergence at some setting is a finding, not a crash.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from bench import UserError
from bench.datasets import IndexStream, load_dataset
from bench.datasets.augment import Augmentation, CropDraws, augment_batch, draws
from bench import distributed
from bench.environment import environment, peak_memory_mb, reset_peak_memory
from bench.evaluation import evaluate_test, final_split
from bench.metrics import PROTOCOL_METRICS, evaluate_split, mean_batch_perplexity
from bench.models import build_model
from bench.projection import codebook_projection
from bench.lock import RunLock
from bench.records import COMPLETE, DIVERGED, atomic_file, check_experiment_name, finite_or_none, write_record
from bench.spec import RunSpec
from bench.tracking import Trackers, image_grid
from methods import TrainContext, collective, method_version
from methods.schedules import warmup_cosine

TRAIN_STREAM, EXTRA_STREAM = 0, 1  # the harness's batches, and the method's further batches (MQ's outer)
LOG_EVERY = 10  # progress-bar refreshes and loss checks; each one syncs the host with the device


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


@contextlib.contextmanager
def torch_settings(device: torch.device, threads: int):
    """torch's process-wide settings for one run, restored when it ends (normally, on an error or on Ctrl-C).

    On the CPU, the backward of tensor indexing (codebook[idx], inside vector-quantize-pytorch) accumulates in a
    thread-dependent order unless deterministic algorithms are on; there the deterministic kernel is also the
    faster one (0.6 ms against 1.7 ms for 8192 rows). On a GPU it would cost speed: left off.
    """
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        if threads:
            torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(device.type == "cpu", warn_only=True)
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: the step it reached and the step its rerun resumes from (its last checkpoint)."""

    def __init__(self, run_id: str, step: int, resume_from: int):
        super().__init__(run_id)
        self.run_id, self.step, self.resume_from = run_id, step, resume_from

    def message(self) -> str:
        where = (f"from step {self.resume_from}, its last checkpoint" if self.resume_from
                 else "it starts over: no checkpoint was written yet")
        return f"interrupted at step {self.step}; rerun the same command to resume ({self.run_id}: {where})"


class LossWatch:
    """The training loss of every step, kept on the device in a small buffer and read in one transfer at the
    loop's syncs (where the progress bar is refreshed, and before validation and checkpoints): a non-finite
    loss is found, with its step and the last finite loss before it, without a host sync per step."""

    def __init__(self, device: torch.device, last_finite: float | None = None):
        self.buffer = torch.zeros(LOG_EVERY, dtype=torch.float32, device=device)
        self.count = 0
        self.last: float | None = last_finite  # the latest loss read
        self.last_finite = last_finite
        self.diverged_step: int | None = None  # the step (1-based) whose loss was first non-finite

    @property
    def full(self) -> bool:
        return self.count == len(self.buffer)

    def add(self, loss: torch.Tensor) -> None:
        self.buffer[self.count].copy_(loss.detach())  # no sync: a device-side copy
        self.count += 1

    def check(self, step: int) -> bool:
        """Read the losses of the steps since the last check (`step` is the step just done); True when one is
        non-finite."""
        collective.all_reduce_mean_(self.buffer)  # several ranks: the global batch's loss, the same on every rank
        values, first = self.buffer[:self.count].tolist(), step - self.count + 1
        self.count = 0
        for i, value in enumerate(values):
            self.last = value
            if not math.isfinite(value):
                self.diverged_step = first + i
                return True
            self.last_finite = value
        return False


class Trainer:
    def __init__(self, spec: RunSpec, out_dir: str | Path, scratch_dir: str | Path, progress: bool = True,
                 keep_checkpoints: bool = False, submitit_ranks: bool = False):
        self.spec = spec
        self.submitit_ranks = submitit_ranks  # one task of a multi-task submitit job: its rank from submitit
        self.out_dir, self.scratch_dir = Path(out_dir), Path(scratch_dir)
        self.progress = progress
        self.keep_checkpoints = keep_checkpoints  # else the run's checkpoint is removed once its record is written
        self._scope: contextlib.ExitStack | None = None  # torch's settings for the run, undone by close()

    @property
    def run_id(self) -> str:
        return self.spec.run_id()

    @property
    def record_path(self) -> Path:
        return self.out_dir / self.spec.experiment / f"{self.run_id}.json"

    @property
    def run_dir(self) -> Path:
        return self.scratch_dir / self.spec.experiment / self.run_id

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    @property
    def lock_path(self) -> Path:
        return self.scratch_dir / self.spec.experiment / f"{self.run_id}.lock"

    def __call__(self) -> Path:
        if self.submitit_ranks:
            distributed.export_submitit_environment()
        distributed.init_process_group(self.spec.device)
        if distributed.broadcast_flag(self.record_path.exists()):  # rank 0's view decides for every rank
            return self.record_path
        check_experiment_name(self.spec.experiment)
        # one process per run: under data parallelism rank 0 holds the lock for its ranks
        with RunLock(self.lock_path, self.run_id) if distributed.is_main() else contextlib.nullcontext():
            if distributed.broadcast_flag(self.record_path.exists()):  # another process finished it meanwhile
                print(f"{self.run_id}: finished by the other process; skip (record exists)", flush=True)
                return self.record_path
            try:
                self.setup()
                self.train(self.spec.steps)
                return self.finish()
            except KeyboardInterrupt:  # nothing half-done was saved: checkpoints and records are atomic
                raise RunInterrupted(self.run_id, getattr(self, "step", 0), getattr(self, "saved_step", 0)) from None
            except RuntimeError as error:
                if not distributed.is_collective_failure(error):
                    raise
                raise UserError(distributed.failure_line(self.run_id, getattr(self, "step", 0),
                                                         getattr(self, "saved_step", 0), error)) from None
            finally:
                self.close()

    def close(self) -> None:
        """Undo torch's process-wide settings of the run and close its trackers (a Trainer called as a function
        does it itself)."""
        if getattr(self, "trackers", None) is not None:
            self.trackers.close()
        if self._scope is not None:
            self._scope.close()
            self._scope = None

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def checkpoint(self, *args, **kwargs):
        """submitit calls this on preemption or timeout: requeue a fresh Trainer, which resumes from the last
        checkpoint on disk (saving here, from a signal handler mid-step, could capture half a step)."""
        import submitit

        return submitit.helpers.DelayedSubmission(Trainer(self.spec, self.out_dir, self.scratch_dir, progress=False,
                                                          keep_checkpoints=self.keep_checkpoints,
                                                          submitit_ranks=self.submitit_ranks))

    # --- setup ------------------------------------------------------------------------------------------

    def setup(self) -> None:
        spec = self.spec
        spec.validate()
        self.started = time.perf_counter()
        ranked_device = distributed.init_process_group(spec.device)
        self.world, self.rank = collective.world_size(), collective.rank()
        distributed.check_batch(spec.batch_size, self.world)
        self.progress = self.progress and self.rank == 0
        self.device = resolve_device(ranked_device or spec.device)
        self.close()
        self._scope = contextlib.ExitStack()
        self._scope.enter_context(torch_settings(self.device, spec.threads))
        reset_peak_memory(self.device)
        self.data = load_dataset(spec.dataset, spec.data_root, spec.download).to(self.device)
        torch.manual_seed(spec.seed)
        self.model = distributed.check_batchnorm(build_model(spec), self.device).to(self.device)
        self.quantizer = self.model.quantizer
        self.model.setup_training(spec.steps)
        self.quantizer.setup_training(spec.steps)
        self.optimizer = torch.optim.AdamW(
            self.model.autoencoder_parameters(), lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay,
            eps=spec.adam_eps,
        )
        collective.average_gradients_before_step(self.optimizer)  # several ranks: the global batch's gradient
        self.autocast = autocast_for(spec, self.device)
        self.train_stream = IndexStream(len(self.data.train), spec.batch_size, spec.seed, TRAIN_STREAM, self.device)
        self.extra_stream = IndexStream(len(self.data.train), spec.batch_size, spec.seed, EXTRA_STREAM, self.device)
        self.ctx = TrainContext(
            model=self.model, loss_fn=self.loss_fn, optimizer=self.optimizer, draw_batch=self.draw_extra_batch,
            total_steps=spec.steps, autocast=self.autocast,
        )
        self.step, self.extra_position, self.train_seconds, self.previous_wall, self.resumes = 0, 0, 0.0, 0.0, 0
        self.saved_step = 0  # the step of the checkpoint on disk, where a rerun resumes
        self.curves: list[dict] = []
        self.losses = LossWatch(self.device)
        self.augmentation = Augmentation(spec.random_crop, spec.hflip)
        if self.checkpoint_path.exists():
            self.load_checkpoint()
        self.trackers = Trackers(spec.log if self.rank == 0 else (), self.scratch_dir / spec.experiment, self.run_id, spec.to_dict(),
                                 spec.experiment)

    def loss_fn(self, images):
        with self.autocast():
            return self.model.task_loss(images)

    def draw_extra_batch(self):
        images = self.batch(self.extra_stream, self.extra_position)
        self.extra_position += 1
        self.prefetch(self.extra_stream, self.extra_position)
        return images

    def batch(self, stream: IndexStream, position: int):
        """Batch `position` of a training stream, augmented when the run asks for it (training batches only)."""
        rows = self.own_rows(stream(position))
        if not self.augmentation.active:
            return self.data.train[rows]
        d = self.own_draws(draws(self.augmentation, self.spec.seed, stream.stream, position, len(rows) * self.world))
        if getattr(self.data.train, "crops_at_decode", False):  # folders crop the resized image as they decode
            return self.data.train.augmented(rows, d)
        return augment_batch(self.data.train[rows], d)

    def own_rows(self, rows):
        """This rank's contiguous slice of a global batch's rows (all of them in one process)."""
        if self.world == 1:
            return rows
        n = len(rows) // self.world
        return rows[self.rank * n:(self.rank + 1) * n]

    def own_draws(self, d: CropDraws) -> CropDraws:
        if self.world == 1:
            return d
        n = len(d.side) // self.world
        part = slice(self.rank * n, (self.rank + 1) * n)
        return CropDraws(side=d.side[part], x=d.x[part], y=d.y[part], flip=d.flip[part])

    def prefetch(self, stream: IndexStream, position: int) -> None:
        """Datasets streamed from disk start decoding a coming batch now; in-memory ones need nothing."""
        prefetch = getattr(self.data.train, "prefetch", None)
        if prefetch is None:
            return
        rows = self.own_rows(stream(position))
        if self.augmentation.active and getattr(self.data.train, "crops_at_decode", False):
            prefetch(rows, self.own_draws(draws(self.augmentation, self.spec.seed, stream.stream, position,
                                                len(rows) * self.world)))
        elif not self.augmentation.active:
            prefetch(rows)

    # --- the loop ---------------------------------------------------------------------------------------

    def train(self, until: int) -> None:
        spec, model = self.spec, self.model
        model.train()
        bar = tqdm(total=until, initial=self.step, desc=self.run_id, disable=not self.progress,
                   dynamic_ncols=True, leave=False)
        segment_start = time.perf_counter()
        try:
            while self.step < until:
                for group in self.optimizer.param_groups:
                    group["lr"] = spec.lr * warmup_cosine(self.step, spec.warmup_steps, spec.steps)
                images = self.batch(self.train_stream, self.step)
                self.prefetch(self.train_stream, self.step + 1)
                self.ctx.step = self.step
                model.before_step(self.step)
                result = self.quantizer.training_step(self.ctx, images)  # the method's update rule
                model.after_step(images)  # the model's own step (VQGAN's discriminator), whatever the method
                self.losses.add(result.loss)
                self.step += 1
                bar.update(1)
                evaluate_now = self.step == spec.steps or (spec.eval_every and self.step % spec.eval_every == 0)
                checkpoint_now = self.step == spec.steps or (spec.ckpt_every and self.step % spec.ckpt_every == 0)
                if self.losses.full or evaluate_now or checkpoint_now or self.step == until:
                    if self.losses.check(self.step):  # diverged: never validated, never checkpointed
                        break
                    if self.progress or self.trackers:
                        batch_ppl = mean_batch_perplexity(result.output.indices, self.quantizer.codebook_size)
                        bar.set_postfix(loss=f"{self.losses.last:.4f}", batch_ppl=f"{batch_ppl:.1f}")
                        self.trackers.scalars(self.step, {"train/loss": self.losses.last, "train/batch_perplexity":
                                                          batch_ppl, "train/lr": self.optimizer.param_groups[0]["lr"]})
                if evaluate_now or checkpoint_now:
                    self.train_seconds += self.elapsed_since(segment_start)
                    if evaluate_now:  # every rank validates its slice of the split (one process: all of it)
                        self.curves.append(self.validate())
                        self.trackers.scalars(self.step, {f"val/{k}": v for k, v in self.curves[-1].items()
                                                          if k not in ("step", "train_s")})
                    if checkpoint_now and self.rank == 0:
                        self.save_checkpoint()
                    distributed.barrier()  # within the collective timeout
                    segment_start = time.perf_counter()
        finally:
            bar.close()
        self.train_seconds += self.elapsed_since(segment_start)

    @property
    def diverged(self) -> bool:
        return self.losses.diverged_step is not None

    def elapsed_since(self, start: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def validate(self) -> dict:
        """One point of the validation curve. Every rank calls it and measures its slice of the split; the sums
        are all-reduced, so every rank gets the whole split's point (rank 0's is the one kept)."""
        result = evaluate_split(self.model, self.data.val, self.quantizer.codebook_size,
                                self.spec.eval_batch_size, self.autocast, sharded=True)
        m = result.metrics
        return {"step": self.step, "train_s": round(self.train_seconds, 3), "mse": m["mse"],
                "perplexity": m["perplexity"], "usage": m["usage"],
                **{f"method/{k}": v for k, v in self.quantizer.interval_stats().items()}}  # since the last point

    @property
    def data_fingerprint(self) -> str | None:
        """What fixes the dataset's splits where its name does not (a folder's file lists): None for the others."""
        return (getattr(self.data, "info", None) or {}).get("fingerprint")

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
            "last_finite_loss": self.losses.last_finite,
            "data_fingerprint": self.data_fingerprint,
        }
        with atomic_file(self.checkpoint_path) as f:  # a kill mid-save leaves the previous checkpoint intact
            torch.save(state, f)
        self.saved_step = self.step

    def load_checkpoint(self) -> None:
        path = self.checkpoint_path
        corrupt = lambda error: UserError(  # noqa: E731
            f"checkpoint {path} is corrupt or unusable ({type(error).__name__}: {error}); delete it to start this "
            f"run over: rm {path}")
        try:
            state = torch.load(path, map_location=self.device, weights_only=False)
        except Exception as error:
            raise corrupt(error) from None
        saved = state.get("data_fingerprint") if isinstance(state, dict) else None
        if saved is not None and saved != self.data_fingerprint:
            raise UserError(f"the files of dataset {self.spec.dataset} changed since run {self.run_id} was "
                            f"checkpointed (split fingerprint {saved[:12]} -> {str(self.data_fingerprint)[:12]}: "
                            f"images added, removed or renamed move others between the hashed splits), so it cannot "
                            f"resume on them; restore the files, or start the run over: rm {path}")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.quantizer.load_training_state(state["method"])
            self.model.load_training_state(state["model_training"])
        except Exception as error:
            raise corrupt(error) from None
        self.step, self.extra_position = state["step"], state["extra_position"]
        self.curves, self.train_seconds = state["curves"], state["train_seconds"]
        self.previous_wall = state["wall_seconds"]
        self.resumes = state["resumes"] + 1
        self.saved_step = self.step
        self.losses = LossWatch(self.device, state.get("last_finite_loss"))
        torch.set_rng_state(state["rng_cpu"].cpu())
        if state["rng_cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all([s.cpu() for s in state["rng_cuda"]])

    @property
    def samples_path(self) -> Path:
        return self.record_path.with_suffix(".samples.npz")

    def save_samples(self, reconstructions: torch.Tensor, histogram, count: int = 8,
                     projected: int = 32) -> tuple[tuple, str | None]:
        """Images spread over the evaluated split and their reconstructions, beside the record, for the figures,
        with the codebook-versus-features projection of the split's first `projected` images (keys "pca_",
        bench/projection.py) -> ((original, reconstruction), (count, 3, H, W) uint8 each; why there is no
        projection, or None)."""
        import io

        import numpy as np

        split = final_split(self.data, self.spec)
        picks = torch.linspace(0, len(reconstructions) - 1, count).round().long()
        buffer = io.BytesIO()
        original = split[picks.to(split.device)].cpu().numpy()
        reconstruction = reconstructions[picks].numpy()
        try:
            projection = codebook_projection(self.model, split[0:min(projected, len(split))], histogram)
            missing = None
        except ValueError as error:  # a quantizer whose codes cannot be laid over its features: the record says why
            projection, missing = {}, str(error)
        np.savez_compressed(buffer, original=original, reconstruction=reconstruction,
                            **{f"pca_{k}": v for k, v in projection.items()})
        with atomic_file(self.samples_path) as f:  # written before the record: a record always has its samples
            f.write(buffer.getvalue())
        return (original, reconstruction), missing

    # --- the record -------------------------------------------------------------------------------------

    def finish(self) -> Path:
        """Evaluate on the test split (a tuning trial: the validation split; a diverged run: nothing to evaluate)
        and write the record; then remove the run's checkpoint unless --keep-checkpoints (no later stage reads it: gFID ran inside the evaluation)."""
        peak = peak_memory_mb(self.device)
        self.method_stats = self.quantizer.run_stats()  # on every rank: a method may reduce over the ranks
        if self.world > 1:  # the largest rank's
            box = torch.tensor([peak if peak is not None else -1.0], dtype=torch.float64, device=self.device)
            peak = collective.all_reduce_max_(box).item()
            peak = None if peak < 0 else peak
        if self.rank != 0:
            # this rank's slice of the test split, its sums reduced and its reconstructions gathered into rank 0's
            # evaluate_test (in _finish); then rank 0 alone goes on (rFID, LPIPS, gFID, the record) and the others
            # wait for it within the collective timeout
            if not self.diverged:
                evaluate_test(self.model, self.data, self.spec, self.autocast, progress=False)
            distributed.barrier()
            return self.record_path
        try:
            return self._finish(peak)
        finally:
            distributed.barrier()

    def _finish(self, peak: float | None) -> Path:
        spec = self.spec
        eval_start = time.perf_counter()
        if self.diverged:
            print(f"{self.run_id}: diverged at step {self.losses.diverged_step} (non-finite training loss); its record "
                  f"says so, and the runs after it go on", flush=True)
            metrics, null_reasons, eval_info = self.diverged_metrics()
        else:
            metrics, null_reasons, eval_info = evaluate_test(self.model, self.data, spec, self.autocast,
                                                             progress=self.progress)
            samples, missing = self.save_samples(eval_info.pop("reconstructions"), eval_info["code_histogram"])
            if missing:
                eval_info["projection_missing"] = missing
            self.trackers.image(self.step, f"{spec.eval_split}/reconstructions", image_grid(*samples))
        eval_seconds = time.perf_counter() - eval_start
        count = lambda params: sum(p.numel() for p in params)  # noqa: E731
        cost = {
            "wall_s": self.previous_wall + time.perf_counter() - self.started,
            "train_s": self.train_seconds,
            "train_images_per_s": self.step * spec.batch_size / max(self.train_seconds, 1e-9),
            "eval_s": eval_seconds,
            "resumes": self.resumes,
            "peak_mem_mb": peak,
            "params_autoencoder": count(self.model.autoencoder_parameters()),
            "params_method": count(self.quantizer.method_parameters()),
            "params_total": count(self.model.parameters()),
        }
        record = {
            "experiment": spec.experiment,
            "run_id": self.run_id,
            "status": DIVERGED if self.diverged else COMPLETE,
            **({"divergence": {"step": self.losses.diverged_step, "last_finite_loss": self.losses.last_finite,
                               "stopped_at_step": self.step, "steps": spec.steps}} if self.diverged else {}),
            "spec": spec.to_dict(),
            "metrics": metrics,
            "cost": cost,
            "null_reasons": null_reasons,
            "curves": self.curves,
            "method_stats": self.method_stats,  # the method's own training measurements (MQ's finite difference)
            "env": {**environment(self.device), "world_size": self.world, "backend": distributed.backend(),
                    "codebook_size": self.quantizer.codebook_size,
                    "method_version": method_version(spec.method),
                    "export": self.quantizer.export_note(), "model_note": self.model.record_note(),
                    **({"data": json.loads(json.dumps(self.data.info, default=str))}
                       if getattr(self.data, "info", None) else {}), **eval_info},
        }
        non_finite: list[str] = []
        record = finite_or_none(record, "", non_finite)  # JSON has no NaN: null, and why
        for where in non_finite:
            record["null_reasons"].setdefault(where.removeprefix("metrics."), "non-finite value")
        write_record(self.record_path, record)
        self.trackers.summary(self.step, record["metrics"])
        if not self.keep_checkpoints:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        return self.record_path

    def diverged_metrics(self) -> tuple[dict, dict, dict]:
        """A diverged model has no honest test metrics: every one null, with the reason."""
        reason = "training diverged (a non-finite training loss; the record's divergence says where): not evaluated"
        return dict.fromkeys(PROTOCOL_METRICS), dict.fromkeys(PROTOCOL_METRICS, reason), {}
