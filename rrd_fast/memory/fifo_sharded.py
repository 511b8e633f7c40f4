"""FIFO queues shared by several processes: exactly sharded, or replicated on every rank.

Sharded (`memory_sharding: sharded`, the default with several processes). Rank r holds
rows [a_r, b_r) of the K-row queue. Every rank writes the *global* batch's teacher keys,
in global order, into the rows it owns, so the union of the shards is, row for row, the
queue a single process would hold after the same steps. The loss is exact over the union
without any rank holding all K rows or a logits matrix over all of them:

1. gather the global batch's z_s (autograd-aware) and z_t;
2. on each rank, logits against its own rows only (B_global × K/W);
3. all-reduce the per-sample max of both logit sets, then the per-sample sums
   S_s = sum_k exp(s_ik - m_s), S_t = sum_k exp(t_ik - m_t), A = sum_k exp(t_ik - m_t) s_ik;
4. L_i = m_s + log S_s - A / S_t, which is -sum_k p_t(ik) log softmax(s)_ik over all K rows.

Gradients: rank r returns the losses of its own samples. In forward every rank forms the
part of dL_i/dz_s,i that comes from its own rows, sum_k (softmax_s - p_t)_ik q_k / tau_s; in
backward the per-sample incoming gradients are gathered and scale these parts, and the
all-gather's backward sums them onto the rank that owns sample i. So each rank ends up with
the gradient of the mean of its own samples' losses over the full queue, exactly what it
would get with the whole queue locally, and DDP's average over ranks is the single-process
gradient of the global-batch mean. Nothing of size K crosses the network: per step, B×D for
the keys and their gradients and 5 numbers per sample for the statistics. Only the B×D
gradient part is kept for backward, so the queue is written in place (`masked_index_copy_`).
"""

from __future__ import annotations

import torch

from pipelines.batch import Batch
from rrd_fast.memory.collectives import Group, all_gather_rows, all_gather_with_grad, all_reduce_, new_group, row_range, world
from rrd_fast.memory.base import Memory, MemorySpec, RowShard, masked_index_copy_, register_memory, unit_rows
from rrd_fast.memory.fifo import FifoQueue, fifo_positions


class ShardedSoftCrossEntropy(torch.autograd.Function):
    """Per-sample soft cross-entropy over rows spread across ranks (see the module docstring).

    Inputs: the global batch's z_s (B×D, from an autograd all-gather) and z_t, this rank's
    rows, and the [lo, hi) slice of the global batch that belongs to this rank.
    Returns the losses of samples lo..hi-1.
    """

    @staticmethod
    def forward(ctx, zs_all: torch.Tensor, zt_all: torch.Tensor, rows: torch.Tensor,  # type: ignore[override]
                tau_s: float, tau_t: float, lo: int, hi: int, group: Group) -> torch.Tensor:
        s = torch.mm(zs_all, rows.t()).div_(tau_s)
        t = torch.mm(zt_all, rows.t()).div_(tau_t)
        big = torch.stack([s.amax(1), t.amax(1)], 1)
        all_reduce_(big, "max", group)
        m_s, m_t = big[:, :1], big[:, 1:]
        t.sub_(m_t).exp_()
        weighted = torch.bmm(t.unsqueeze(1), s.unsqueeze(2)).view(-1)  # sum_k exp(t - m_t) * s, no B×K temporary
        s.sub_(m_s).exp_()
        sums = torch.stack([s.sum(1), t.sum(1), weighted], 1)
        all_reduce_(sums, "sum", group)
        sum_s, sum_t, weighted = sums.unbind(1)
        loss = m_s.squeeze(1) + sum_s.log() - weighted / sum_t
        # d L_i / d s_ik = softmax_s(ik) - p_t(ik) on this rank's rows; only their part of dL_i/dz_s (B×D) is
        # kept for backward, not the rows, so the queue may be overwritten in place before backward runs.
        kernel = s.div_(sum_s[:, None]).sub_(t.div_(sum_t[:, None]))
        ctx.save_for_backward(torch.mm(kernel, rows).div_(tau_s))
        ctx.group = group
        return loss[lo:hi].clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (grad_zs,) = ctx.saved_tensors
        grad_all = all_gather_rows(grad.contiguous(), ctx.group)
        return grad_all[:, None] * grad_zs, None, None, None, None, None, None, None


class ShardedFifoQueue(Memory):
    """This rank's K/W rows of a queue shared exactly by all ranks (see the module docstring).

    `queue` is the local shard (rows `start`..`stop`-1 of the global queue); `ptr` is the
    global write position, the same on every rank.
    """

    def __init__(self, size: int, dim: int, seed: int = 0) -> None:
        super().__init__()
        self.group = new_group()
        rank, size_w = world()
        if size < size_w:
            raise ValueError(f"queue_size {size} is smaller than the {size_w} processes sharing it")
        if dim <= 0:
            raise ValueError(f"queue dim must be positive, got {dim}")
        self.rank, self.world_size, self.total = rank, size_w, size
        self.start, self.stop = row_range(size, size_w, rank)
        self.register_buffer("queue", unit_rows(seed, self.start, self.stop, dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.total

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write the global batch's keys (gathered from every rank) into the rows this rank owns."""
        self._write(all_gather_rows(keys.float(), self.group))

    @torch.no_grad()
    def _write(self, gathered: torch.Tensor) -> None:
        positions, gathered, next_ptr = fifo_positions(self.ptr, gathered.to(self.queue.dtype), self.total)
        mine = (positions >= self.start) & (positions < self.stop)
        # In place and static-shape: the loss keeps its gradient, not these rows, for backward.
        masked_index_copy_(self.queue, positions - self.start, gathered, mine)
        self.ptr.copy_(next_ptr)

    def _loss(self, z_s: torch.Tensor, zt_all: torch.Tensor, tau_s: float, tau_t: float) -> torch.Tensor:
        with torch.autocast(device_type=z_s.device.type, enabled=False):
            zs_all = all_gather_with_grad(z_s.float(), self.group)
            lo = self.rank * z_s.shape[0]
            return ShardedSoftCrossEntropy.apply(zs_all, zt_all, self.queue.float(), tau_s, tau_t,
                                                 lo, lo + z_s.shape[0], self.group)

    def soft_cross_entropy(self, z_s: torch.Tensor, z_t: torch.Tensor, tau_s: float, tau_t: float) -> torch.Tensor:
        """Per-sample losses of this rank's samples, exact over the union of all shards."""
        return self._loss(z_s, all_gather_rows(z_t.float(), self.group), tau_s, tau_t)

    def loss(self, z_s: torch.Tensor, z_t: torch.Tensor, batch: Batch, tau_s: float, tau_t: float,
             enqueue: str) -> torch.Tensor:
        zt_all = all_gather_rows(z_t.float(), self.group)  # gathered once, for the loss and the enqueue
        if enqueue == "before":
            self._write(zt_all)
        out = self._loss(z_s, zt_all, tau_s, tau_t)
        if enqueue == "after":
            self._write(zt_all)
        return out

    def row_shards(self) -> dict[str, RowShard]:
        return {"queue": RowShard(self.start, self.stop, self.total)}


class ReplicatedFifoQueue(FifoQueue):
    """Every rank holds the whole queue and enqueues the gathered global batch.

    Exact like the sharded queue, but each rank stores all K rows; kept for comparison.
    """

    def __init__(self, size: int, dim: int, seed: int = 0) -> None:
        super().__init__(size, dim, seed)
        self.group = new_group()

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        super().enqueue(all_gather_rows(keys.float(), self.group))

    def row_shards(self) -> dict[str, RowShard]:
        return {"queue": RowShard(0, self.size, self.size, replicated=True)}


@register_memory("fifo", "sharded")
def _sharded_fifo(spec: MemorySpec) -> Memory:
    return ShardedFifoQueue(spec.size, spec.dim, spec.seed)


@register_memory("fifo", "replicated")
def _replicated_fifo(spec: MemorySpec) -> Memory:
    return ReplicatedFifoQueue(spec.size, spec.dim, spec.seed)
