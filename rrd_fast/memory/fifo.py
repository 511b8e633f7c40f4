"""The FIFO queue of teacher keys (RRD's memory), one whole copy per process (`local`).

The write position `ptr` is a device tensor and every enqueue is an in-place, static-shape
`index_copy_`, so a compiled step neither syncs with the host nor recompiles as `ptr` moves.
"""

from __future__ import annotations

import torch

from pipelines.batch import Batch
from rrd_fast.memory.base import Memory, MemorySpec, RowShard, register_memory, soft_target_cross_entropy, unit_rows


def fifo_loss(queue: Memory, z_s: torch.Tensor, z_t: torch.Tensor, tau_s: float, tau_t: float,
              enqueue: str) -> torch.Tensor:
    """The loss against a FIFO queue, with the batch's own keys enqueued "before" (2025) or "after" (paper)."""
    if enqueue == "before":
        queue.enqueue(z_t)
    out = queue.soft_cross_entropy(z_s, z_t, tau_s, tau_t)
    if enqueue == "after":
        queue.enqueue(z_t)
    return out


class FifoQueue(Memory):
    """K×D queue of unit-norm rows; `enqueue` overwrites the oldest rows, wrapping around.

    Any batch size works (the reference required K % B == 0). Rows start as random unit
    vectors drawn from `seed`, so runs are reproducible from the first step. `per_rank`
    marks a queue that is one of several unsynchronised per-process queues.
    """

    def __init__(self, size: int, dim: int, seed: int = 0, per_rank: bool = False) -> None:
        super().__init__()
        if size <= 0 or dim <= 0:
            raise ValueError(f"queue size and dim must be positive, got {size}×{dim}")
        self.per_rank = per_rank
        self.register_buffer("queue", unit_rows(seed, 0, size, dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return int(self.queue.shape[0])

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        positions, keys, next_ptr = fifo_positions(self.ptr, keys.detach().to(self.queue.dtype), self.size)
        # In place: the loss keeps its gradient, not these rows, for backward (SoftTargetCrossEntropy).
        self.queue.index_copy_(0, positions, keys)
        self.ptr.copy_(next_ptr)

    def soft_cross_entropy(self, z_s: torch.Tensor, z_t: torch.Tensor, tau_s: float, tau_t: float) -> torch.Tensor:
        return soft_target_cross_entropy(z_s, z_t, self.queue, tau_s, tau_t)

    def loss(self, z_s: torch.Tensor, z_t: torch.Tensor, batch: Batch, tau_s: float, tau_t: float,
             enqueue: str) -> torch.Tensor:
        return fifo_loss(self, z_s, z_t, tau_s, tau_t, enqueue)

    def row_shards(self) -> dict[str, RowShard]:
        return {"queue": RowShard(0, self.size, self.size, per_rank=self.per_rank)}


def fifo_positions(ptr: torch.Tensor | int, keys: torch.Tensor,
                   size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | int]:
    """Queue rows that `keys` land in when written from `ptr` on, the keys that survive, the next `ptr`.

    When more keys than rows arrive, only the newest `size` survive, at the rows a
    sequential write would have left them in. `ptr` may be a device tensor (no host sync).
    """
    n, start = keys.shape[0], ptr
    if n > size:
        start = (start + n - size) % size
        keys, n = keys[-size:], size
    return (start + torch.arange(n, device=keys.device)) % size, keys, (start + n) % size


@register_memory("fifo", "local")
def _local_fifo(spec: MemorySpec) -> Memory:
    return FifoQueue(spec.size, spec.dim, spec.seed, per_rank=spec.world_size > 1)

