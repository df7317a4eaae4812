"""Small torch.distributed helpers for the methods, no-ops in one process (no process group, or one rank).

Data-parallel training gives each rank an equal, contiguous slice of the global batch (rank 0 the first rows).
A method whose update depends on more than a mean over rows (EMA statistics, k-means, batch entropies, noise)
uses these helpers so that an N-rank run computes what one process computes on the whole batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
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
