"""Memories of teacher embeddings that relational losses compare against.

Every memory implements one interface (`Memory`): `loss(...)` returns the per-sample losses
of this rank's samples (RRD's soft cross-entropy, or CRD's NCE) and updates the memory in the
order the method asks for. Memories are registered by (kind, sharding mode), so a term never
knows how many processes share its memory or how its rows are split:

- kind `fifo`: a K×D queue of teacher keys (this file; sharded and replicated variants in
  `memory/fifo_sharded.py`); kind `momentum`: CRD's N×D banks indexed by sample (`memory/momentum.py`);
  kind `contrast`: the same banks with CRD's own NCE loss (`memory/contrast.py`).
- sharding `local`: each process keeps its own memory, fed only its own samples (the
  reference code's behaviour under DDP); `replicated`: every process holds the whole
  memory and feeds it the gathered global batch; `sharded`: each process holds 1/W of the
  rows and the loss is computed exactly over their union.

Memories also declare their large buffers as `RowShard`s, so that resume state can be
written per rank and re-split on load for another number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.batch import Batch
from pipelines.errors import UserError
from pipelines.registry import Registry


class SoftTargetCrossEntropy(torch.autograd.Function):
    """Per-sample  -sum_k softmax(t)_k log softmax(s)_k  over logits s = z_s·K^T/tau_s, t = z_t·K^T/tau_t.

    The gradient w.r.t. z_s, (softmax(s)·sum_k p_t - p_t) K / tau_s, is formed in forward and only
    it (B×D) is kept for backward, not the K×D keys: a memory may then overwrite its rows in place
    right after the loss (the `after` enqueue order) and backward still sees the rows the loss used.
    z_t and the keys get no gradient (the target is detached).
    """

    @staticmethod
    def forward(ctx, z_s: torch.Tensor, z_t: torch.Tensor, keys: torch.Tensor,  # type: ignore[override]
                tau_s: float, tau_t: float) -> torch.Tensor:
        log_q = F.log_softmax(z_s @ keys.t() / tau_s, dim=1)
        p_t = F.softmax(z_t @ keys.t() / tau_t, dim=1)
        kernel = log_q.exp() * p_t.sum(dim=1, keepdim=True) - p_t  # d loss_i / d s_ik
        ctx.save_for_backward(kernel @ keys / tau_s)
        return -(p_t * log_q).sum(dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (grad_zs,) = ctx.saved_tensors
        return grad[:, None] * grad_zs, None, None, None, None


def soft_target_cross_entropy(
    z_s: torch.Tensor, z_t: torch.Tensor, keys: torch.Tensor, tau_s: float, tau_t: float
) -> torch.Tensor:
    """Per-sample  -sum_k softmax(z_t·k/tau_t) log softmax(z_s·k/tau_s), the target detached."""
    with torch.autocast(device_type=z_s.device.type, enabled=False):
        dtype = torch.promote_types(torch.promote_types(z_s.dtype, keys.dtype), torch.float32)  # fp64 stays fp64
        return SoftTargetCrossEntropy.apply(z_s.to(dtype), z_t.detach().to(dtype), keys.detach().to(dtype), tau_s, tau_t)


@torch.no_grad()
def masked_index_copy_(buffer: torch.Tensor, rows: torch.Tensor, values: torch.Tensor, keep: torch.Tensor) -> None:
    """buffer[rows[e]] = values[e] for the entries e with keep[e], in place and with static shapes.

    A compiled step cannot select the kept entries (their number depends on the data), so every
    entry is written: a dropped one rewrites the first kept entry's row with that entry's value, or,
    when none is kept, row 0 with its own value. Duplicate writes then carry equal values, so the
    result is exact and does not depend on the order of the writes. Rows of dropped entries may be
    out of range. Kept rows are expected to be distinct (as in a plain index_copy_).
    """
    first = keep.to(torch.uint8).argmax().reshape(1)  # the first kept entry; 0 when none is
    rows = torch.where(keep, rows, 0)
    fallback_row = torch.where(keep.any(), rows.index_select(0, first), 0)
    fallback_value = torch.where(keep.any(), values.index_select(0, first), buffer[:1].to(values.dtype))
    rows = torch.where(keep, rows, fallback_row)
    buffer.index_copy_(0, rows, torch.where(keep[:, None], values, fallback_value).to(buffer.dtype))


_ROW_BLOCK = 4096


def random_rows(seed: int, start: int, stop: int, dim: int, stream: int = 0, uniform: bool = False) -> torch.Tensor:
    """Rows [start, stop) of a fixed, conceptually unbounded matrix of N(0, 1) entries (U[0, 1) if `uniform`).

    Rows come in blocks of 4096, each drawn from its own generator, so any rank can build
    exactly its slice of an initial memory without ever materialising the whole of it,
    and a sharded memory starts out equal to the single-process one row for row.
    """
    if stop <= start:
        return torch.empty(0, dim)
    parts = []
    for block in range(start // _ROW_BLOCK, (stop - 1) // _ROW_BLOCK + 1):
        block_seed = ((seed * 1_000_003 + stream) * 1_000_033 + block) % (2**63 - 1)
        generator = torch.Generator().manual_seed(block_seed)
        rows = (torch.rand if uniform else torch.randn)(_ROW_BLOCK, dim, generator=generator)
        lo = max(start - block * _ROW_BLOCK, 0)
        hi = min(stop - block * _ROW_BLOCK, _ROW_BLOCK)
        parts.append(rows[lo:hi])
    return torch.cat(parts)


def unit_rows(seed: int, start: int, stop: int, dim: int, stream: int = 0) -> torch.Tensor:
    """Rows [start, stop) of a fixed matrix of random unit vectors (see `random_rows`)."""
    return F.normalize(random_rows(seed, start, stop, dim, stream), dim=1)


@dataclass(frozen=True)
class RowShard:
    """Which rows of a `total`-row buffer this process holds, for saving and re-splitting.

    `replicated`: every process holds the same rows (only rank 0 needs to write them);
    `per_rank`: each process holds its own unrelated copy (memory_sharding=local), which can
    only be restored onto the same number of processes.
    """

    start: int
    stop: int
    total: int
    replicated: bool = False
    per_rank: bool = False


@dataclass(frozen=True)
class MemorySpec:
    """What a memory factory may need; fields a kind does not use are ignored."""

    size: int  # K: queue rows (fifo) or negatives drawn per sample (momentum, contrast)
    dim: int
    seed: int
    world_size: int = 1
    num_samples: int = 0  # N: rows of a memory indexed by sample (momentum, contrast)
    labels: Any = None  # N training labels, for class-aware negatives (momentum)
    momentum: float = 0.5


class Memory(nn.Module):
    """Interface of every memory; see the module docstring."""

    def loss(self, z_s: torch.Tensor, z_t: torch.Tensor, batch: Batch, tau_s: float, tau_t: float,
             enqueue: str) -> torch.Tensor:
        """Per-sample losses of this rank's samples; the memory is updated `enqueue` ("before"/"after") them."""
        raise NotImplementedError

    def row_shards(self) -> dict[str, RowShard]:
        """Buffers (by attribute name) that resume state stores row by row; others go in the module state."""
        return {}


class MemorySettingError(UserError):
    """An unknown memory kind or sharding mode."""


MemoryFactory = Callable[[MemorySpec], Memory]
MEMORIES: Registry[Registry[MemoryFactory]] = Registry("memory", setting="method.options.rrd.memory",
                                                       error=MemorySettingError)


def register_memory(kind: str, sharding: str) -> Callable[[MemoryFactory], MemoryFactory]:
    """Register `factory(spec) -> Memory` for memory `kind` under a `distributed.memory_sharding` mode."""
    if kind not in MEMORIES:
        MEMORIES.register(Registry("sharding mode", setting="distributed.memory_sharding", error=MemorySettingError),
                          name=kind)
    return MEMORIES.get(kind).register(name=sharding)


def build_memory(kind: str, sharding: str, spec: MemorySpec) -> Memory:
    return MEMORIES.get(kind).get(sharding)(spec)
