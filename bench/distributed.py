"""Data-parallel runs: one process group per process, from the environment its launcher set.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a submitit task gets the same from
`submitit.helpers.TorchDistributedEnvironment().export()` (see `export_submitit_environment`). With WORLD_SIZE
above 1 the first Trainer of the process joins the group: gloo on the CPU, nccl on GPUs (device
cuda:LOCAL_RANK), with a bounded collective timeout (VQB_COLLECTIVE_TIMEOUT_S, default 1800 s), so a rank that
died or hangs makes the others fail within it instead of waiting forever. Rank 0 alone prints, tracks, writes
checkpoints, samples and records; every rank trains on its contiguous slice of the global batch, and measures
its contiguous slice of the validation and test splits (bench.metrics.evaluate_split, sharded), whose sums and
histograms are all-reduced and whose test reconstructions are gathered to rank 0 for rFID, KID and LPIPS.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from bench import UserError
from methods import collective

TIMEOUT_ENV = "VQB_COLLECTIVE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800.0


def environment_world_size() -> int:
    """The world size the launcher asked for (1 without one)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UserError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def environment_rank() -> int:
    """This process's rank as the launcher set it (0 without one): before the group exists, who prints."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def collective_timeout() -> datetime.timedelta:
    text = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(text)
    except ValueError:
        raise UserError(f"{TIMEOUT_ENV}={text!r} is not a number of seconds") from None
    if not seconds > 0:
        raise UserError(f"{TIMEOUT_ENV} must be positive, got {text}")
    return datetime.timedelta(seconds=seconds)


def export_submitit_environment() -> None:
    """Inside a submitit task of a multi-task job: set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT."""
    import submitit

    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


def check_batch(batch_size: int, world: int | None = None) -> None:
    world = environment_world_size() if world is None else world
    if world > 1 and batch_size % world:
        raise UserError(f"--batch-size {batch_size} (the global batch) does not split into {world} equal rank "
                        f"slices; pass a multiple of {world}")


def init_process_group(device_name: str) -> str | None:
    """Join the process group the environment describes (once per process); returns the device to use instead
    of `device_name` (cuda:LOCAL_RANK on GPUs), or None in one process."""
    if environment_world_size() <= 1:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    gpu = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if not dist.is_initialized():
        backend = "nccl" if gpu else "gloo"
        if gpu:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=collective_timeout())
    return f"cuda:{local_rank}" if gpu else "cpu"


def backend() -> str | None:
    return dist.get_backend() if collective.distributed() else None


def is_main() -> bool:
    return collective.rank() == 0


def barrier() -> None:
    if collective.distributed():
        dist.barrier()


def broadcast_flag(value: bool) -> bool:
    """Rank 0's value on every rank."""
    if not collective.distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


_FAILURE_WORDS = ("gloo", "nccl", "timed out", "connection closed", "connection reset", "broken pipe",
                  "watchdog", "peer")


def is_collective_failure(error: BaseException) -> bool:
    """A collective that failed or timed out because another rank died or hangs (not a bug of this rank)."""
    if not collective.distributed():
        return False
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error).lower()
    return any(word in text for word in _FAILURE_WORDS)


def failure_line(run_id: str, step: int, saved_step: int, error: BaseException) -> str:
    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    return (f"rank {collective.rank()} of {collective.world_size()} stopped at step {step} of {run_id}: a collective "
            f"with the other ranks failed (another rank died or hung; timeout {collective_timeout().total_seconds():g}"
            f" s, {TIMEOUT_ENV}): {first}; rerun the same command to resume from step {saved_step}")


def check_batchnorm(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Several ranks: BatchNorm becomes SyncBatchNorm on GPUs (nccl); on the CPU gloo has no SyncBatchNorm, so a
    model with BatchNorm is refused there (per-rank batch statistics would make it another method). The default
    `vqvae` has no BatchNorm; VQGAN's discriminator has."""
    if not collective.distributed():
        return model
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if not has_bn:
        return model
    if device.type != "cuda":
        raise UserError("this model has BatchNorm layers (VQGAN's discriminator), which need SyncBatchNorm under "
                        "several ranks; gloo on the CPU does not support it: run it on GPUs or in one process")
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
