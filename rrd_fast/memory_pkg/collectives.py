"""Process-group helpers for state split across ranks.

Memories that shard rows across processes need three things the launcher does not give
them: which contiguous rows a rank owns, collectives that run on a group of their own
(so they never interleave with DDP's gradient buckets), and an all-gather whose backward
pass sends each rank the gradient of the rows it contributed. Everything here degrades
to a no-op in a single process, so the same memory code runs with or without a launcher.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

Group = ProcessGroup | None


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world(group: Group = None) -> tuple[int, int]:
    """(rank, world size) in `group` (the default group if None); (0, 1) without a process group."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def new_group() -> Group:
    """A private group over all ranks. Collective: every rank must call it, in the same order."""
    if not is_distributed() or dist.get_world_size() == 1:
        return None
    return dist.new_group(ranks=list(range(dist.get_world_size())))


def row_range(total: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rows [start, stop) of `total` owned by `rank`: contiguous, sizes differing by at most one."""
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _gather(x: torch.Tensor, group: Group) -> torch.Tensor:
    _, size = world(group)
    if size == 1:
        return x
    x = x.contiguous()
    out = x.new_empty((size * x.shape[0], *x.shape[1:]))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x, group=group)
    return out


def all_gather_rows(x: torch.Tensor, group: Group = None) -> torch.Tensor:
    """Concatenate every rank's `x` along dim 0 in rank order, without autograd.

    All ranks must pass the same shape (the training sampler gives equal per-rank batches).
    """
    return _gather(x.detach(), group)


class _AllGatherRows(torch.autograd.Function):
    """Forward: concatenation in rank order. Backward: every rank's gradient for the
    gathered tensor is summed and each rank receives the slice for the rows it sent
    (a reduce-scatter), so a loss computed anywhere trains the rank that owns the input."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        ctx.rows = x.shape[0]
        return _gather(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        rank, size = world(ctx.group)
        if size == 1:
            return grad, None
        grad = grad.contiguous()
        out = grad.new_empty((ctx.rows, *grad.shape[1:]))
        scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        scatter(out, grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None


def all_gather_with_grad(x: torch.Tensor, group: Group = None) -> torch.Tensor:
    """`all_gather_rows` that autograd can differentiate (see `_AllGatherRows`)."""
    if world(group)[1] == 1:
        return x
    return _AllGatherRows.apply(x, group)


def all_reduce_(x: torch.Tensor, op: str, group: Group = None) -> torch.Tensor:
    """In-place all-reduce by name ("sum" or "max"); returns `x` for chaining."""
    if world(group)[1] > 1:
        dist.all_reduce(x, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op], group=group)
    return x


def all_to_all_rows(x: torch.Tensor, send: list[int], recv: list[int], group: Group = None) -> torch.Tensor:
    """Rank r sends rows x[sum(send[:q]) : sum(send[:q+1])] to rank q and receives recv[q] rows from it, in rank order."""
    if world(group)[1] == 1:
        return x
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
    return out
