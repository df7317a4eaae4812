"""Small torch.distributed helpers for the methods, no-ops in one process (no process group, or one rank).

Data-parallel training gives each rank an equal, contiguous slice of the global batch (rank 0 the first rows).
A method whose update depends on more than a mean over rows (EMA statistics, k-means, batch entropies, noise)
uses these helpers so that an N-rank run computes what one process computes on the whole batch. Sharded
evaluation (bench.metrics.evaluate_split) uses the last ones: each rank's contiguous slice of a split, and the
slices' rows gathered to rank 0.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
from torch import Tensor


_rank_local = False  # inside rank_local(): the helpers act as in one process


def world_size() -> int:
    if _rank_local:
        return 1
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    if _rank_local:
        return 0
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def distributed() -> bool:
    return world_size() > 1


def all_reduce_sum_(t: Tensor) -> Tensor:
    if distributed():
        dist.all_reduce(t)
    return t


def all_reduce_mean_(t: Tensor) -> Tensor:
    if distributed():
        dist.all_reduce(t)
        t.div_(world_size())
    return t


def all_reduce_max_(t: Tensor) -> Tensor:
    if distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_reduce_mean_list_(tensors: list[Tensor]) -> list[Tensor]:
    """Averages a list of tensors over the ranks in place, in one flattened all-reduce."""
    if not distributed() or not tensors:
        return tensors
    by_kind: dict = {}
    for t in tensors:
        by_kind.setdefault((t.dtype, t.device), []).append(t)
    for group in by_kind.values():  # one all-reduce per dtype and device (usually one)
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        flat.div_(world_size())
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
    return tensors


def all_gather_rows(t: Tensor) -> Tensor:
    """(n, ...) on every rank, n equal -> (world * n, ...), rank 0's rows first: the global batch's rows in the
    one-process order. Not differentiable (for statistics under no_grad)."""
    if not distributed():
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def differentiable_mean(t: Tensor) -> Tensor:
    """The mean of t over the ranks, with autograd: each rank's gradient receives the sum of every rank's
    upstream gradient over the world size, so that after the optimizers' gradient average the update equals
    the one-process update of a mean over the whole batch."""
    if not distributed():
        return t
    from torch.distributed import nn as dist_nn

    return dist_nn.all_reduce(t) / world_size()


def average_gradients_before_step(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Register, once, a step pre-hook that averages the .grad of the optimizer's parameters over the ranks in
    one flattened all-reduce before each step (a no-op in one process). Per-rank losses are means over equal
    slices of the global batch, so the average is the gradient of the global mean. Every rank must have the
    same parameters with a gradient (they run the same graph)."""
    if getattr(optimizer, "_vq_bench_grad_average", False):
        return optimizer

    def hook(opt, args, kwargs):
        if not distributed():
            return None
        grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
        all_reduce_mean_list_(grads)
        return None

    optimizer.register_step_pre_hook(hook)
    optimizer._vq_bench_grad_average = True
    return optimizer


# --- sharded evaluation: each rank measures a contiguous slice of a split ------------------------------------


@contextlib.contextmanager
def rank_local():
    """Inside, every helper here acts as in one process: world size 1, rank 0, no collective. Sharded evaluation
    runs each rank's forward passes in it: the ranks reconstruct different slices in possibly different numbers
    of batches, so a forward that reduces over the global batch in training (ibq's batch entropy, also computed
    in eval mode) must stay on its rank's batch instead of waiting for, or mixing with, the other ranks."""
    global _rank_local
    saved, _rank_local = _rank_local, True
    try:
        yield
    finally:
        _rank_local = saved


def shard_sizes(n: int) -> list[int]:
    """The sizes of the ranks' contiguous slices of n rows (rank 0 first); they differ by at most one row (the
    later ranks take the extra rows), and a rank may get none when n < world size. [n] in one process."""
    world = world_size()
    return [(r + 1) * n // world - r * n // world for r in range(world)]


def shard(n: int) -> range:
    """This rank's contiguous slice of n rows (see shard_sizes): range(0, n) in one process."""
    world, me = world_size(), rank()
    return range(me * n // world, (me + 1) * n // world)


GATHER_CHUNK_BYTES = 64 << 20  # per rank and round: bounds what rank 0 receives at once on its device


def gather_rows_to_main(t: Tensor, sizes: list[int], device: torch.device | str | None = None) -> Tensor | None:
    """Rank r's rows t (sizes[r], ...) -> on rank 0 all of them, (sum(sizes), ...) in rank order on t's device;
    None on the other ranks. t itself in one process.

    Uneven slices travel padded to the largest in rounds of at most GATHER_CHUNK_BYTES per rank, each round
    through `device` (the rank's GPU under nccl; default t's device), so rank 0 holds world x one round on the
    device at a time, and the padding is dropped on arrival."""
    if not distributed():
        return t
    world, me = world_size(), rank()
    if len(t) != sizes[me]:
        raise ValueError(f"rank {me} holds {len(t)} rows, but its slice has {sizes[me]}")
    device = torch.device(device) if device is not None else t.device
    row_shape = t.shape[1:]
    row_bytes = max(1, math.prod(row_shape) * t.element_size())
    step = max(1, GATHER_CHUNK_BYTES // row_bytes)
    offsets = [sum(sizes[:r]) for r in range(world)]
    out = torch.empty((sum(sizes), *row_shape), dtype=t.dtype, device=t.device) if me == 0 else None
    for start in range(0, max(sizes), step):
        rows = min(step, max(sizes) - start)
        piece = torch.zeros((rows, *row_shape), dtype=t.dtype, device=device)
        own = t[start:start + rows]
        piece[:len(own)].copy_(own)
        parts = [torch.empty_like(piece) for _ in range(world)] if me == 0 else None
        dist.gather(piece, parts, dst=0)
        if me == 0:
            for r, part in enumerate(parts):
                kept = max(0, min(rows, sizes[r] - start))
                out[offsets[r] + start:offsets[r] + start + kept].copy_(part[:kept])
    return out
