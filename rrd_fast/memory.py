"""Memories of teacher embeddings that relational losses compare against.

The single-process FIFO queue lives here; sharded and replicated variants for several
processes register under the same interface (`build_memory`), so the RRD term never
knows how many processes share its queue.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def soft_target_cross_entropy(
    z_s: torch.Tensor, z_t: torch.Tensor, keys: torch.Tensor, tau_s: float, tau_t: float
) -> torch.Tensor:
    """Per-sample  -sum_k softmax(z_t·k/tau_t) log softmax(z_s·k/tau_s), the target detached."""
    with torch.autocast(device_type=z_s.device.type, enabled=False):
        keys = keys.float()
        logits_s = z_s.float() @ keys.t() / tau_s
        with torch.no_grad():
            p_t = F.softmax(z_t.float() @ keys.t() / tau_t, dim=1)
        return -(p_t * F.log_softmax(logits_s, dim=1)).sum(dim=1)


class FifoQueue(nn.Module):
    """K×D queue of unit-norm rows; `enqueue` overwrites the oldest rows, wrapping around.

    Any batch size works (the reference required K % B == 0). Rows start as random unit
    vectors drawn from `seed`, so runs are reproducible from the first step.
    """

    def __init__(self, size: int, dim: int, seed: int = 0) -> None:
        super().__init__()
        if size <= 0 or dim <= 0:
            raise ValueError(f"queue size and dim must be positive, got {size}×{dim}")
        generator = torch.Generator().manual_seed(seed)
        rows = F.normalize(torch.randn(size, dim, generator=generator), dim=1)
        self.register_buffer("queue", rows)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return int(self.queue.shape[0])

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        keys = keys.detach().to(self.queue.dtype)
        n, k = keys.shape[0], self.size
        start = int(self.ptr)
        if n > k:  # only the newest K keys survive; they land where a sequential write would put them
            start = (start + n - k) % k
            keys, n = keys[-k:], k
        positions = (start + torch.arange(n, device=self.queue.device)) % k
        # Out of place: a loss computed before this call may still hold the old rows for backward.
        self.queue = self.queue.index_copy(0, positions, keys)
        self.ptr.fill_((start + n) % k)

    def soft_cross_entropy(self, z_s: torch.Tensor, z_t: torch.Tensor, tau_s: float, tau_t: float) -> torch.Tensor:
        return soft_target_cross_entropy(z_s, z_t, self.queue, tau_s, tau_t)


MemoryFactory = Callable[..., nn.Module]
_MEMORIES: dict[str, MemoryFactory] = {}


def register_memory(sharding: str) -> Callable[[MemoryFactory], MemoryFactory]:
    """Register `factory(size, dim, seed) -> memory` for a `distributed.memory_sharding` mode."""

    def wrap(factory: MemoryFactory) -> MemoryFactory:
        _MEMORIES[sharding] = factory
        return factory

    return wrap


def build_memory(sharding: str, size: int, dim: int, seed: int) -> nn.Module:
    if sharding not in _MEMORIES:
        raise ValueError(f"distributed.memory_sharding: unknown mode {sharding!r} (known: {', '.join(sorted(_MEMORIES))})")
    return _MEMORIES[sharding](size=size, dim=dim, seed=seed)


register_memory("local")(FifoQueue)
