"""CRD-style momentum memory for RRD (`method.options.rrd.memory: momentum`).

Two N×D banks indexed by training-sample index: `bank_s` holds student embeddings and
`bank_t` teacher embeddings, each row updated as normalize(m·row + (1-m)·z) with m = 0.5
whenever its sample is in a batch (after the loss, as in the reference). For each sample
K+1 rows are compared: column 0 is the sample's own row, columns 1..K are negatives drawn
uniformly, with replacement, from samples of *other* classes (CRD's "exact" sampling). As
in the reference, the student's embedding is scored against the teacher bank and the
teacher's embedding against the student bank:
  L_i = -sum_j softmax(z_t,i · bank_s[c_ij] / tau_t) log softmax(z_s,i · bank_t[c_ij] / tau_s).
Unlike the reference, the scores are plain scaled cosine similarities as in the FIFO
variant; the reference feeds CRD's NCE scores exp(x/0.07)/Z into the softmax instead.

Negatives are a pure function of (seed, step counter, sample index, column), computed
with a counter-based hash: any rank can compute any sample's negatives, the draw does not
depend on how the batch is split, and a resumed run draws what an uninterrupted one would.

Sharded by sample index (`ShardedMomentumMemory`): rank r owns rows [a_r, b_r) of both banks,
N/W rows each. The logits are computed where the rows live; rows are never fetched. Each
rank draws the negatives of its own b samples and sends every drawn row *index* (4 bytes)
to the rank that owns the row; every rank has the global batch's z_s and z_t (an all-gather
of B×D numbers), scores the entries it received against its own rows, and the per-sample
softmax statistics are all-reduced exactly as for the sharded FIFO queue. Fetching rows
instead would move b·(K+1)·D floats per bank per rank and step (at b=256, K=16384, D=128:
2.1 GB per bank) where the index exchange moves b·(K+1) int32 (16.8 MB); the multiply-adds
split evenly across ranks either way, and the momentum update needs no traffic since each
owner already holds the gathered embeddings of the samples whose rows it owns.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.batch import Batch
from rrd_fast.distributed import (Group, all_gather_rows, all_gather_with_grad, all_reduce_, all_to_all_rows, new_group,
                                  row_range, world)
from rrd_fast.memory import Memory, MemorySpec, RowShard, register_memory, unit_rows

_MASK32 = 0xFFFFFFFF
_CHUNK = 1 << 16  # sampled entries scored at a time: bounds the E×D temporaries of the sharded loss


def _hash32(x: torch.Tensor | int) -> torch.Tensor | int:
    """A 32-bit integer mixer for ints or int64 tensors with values in [0, 2^32); products stay below 2^63."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _MASK32
    return x ^ (x >> 16)


class NegativeSampler:
    """Draws K other-class negatives per sample as a pure function of (seed, draw, index, column).

    Samples are kept sorted by class; a uniform position among the N - n_c samples of other
    classes skips over the block of the sample's own class c.
    """

    def __init__(self, labels: Any, negatives: int, seed: int) -> None:
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)
        if labels.numel() == 0:
            raise ValueError("momentum memory needs the training labels")
        if int(labels.min()) < 0:
            raise ValueError("momentum memory: negative class label in the training labels")
        counts = torch.bincount(labels)
        if int((counts > 0).sum()) < 2:
            raise ValueError("momentum memory draws negatives from other classes, but the training set has one class")
        if negatives <= 0:
            raise ValueError(f"the number of negatives must be positive, got {negatives}")
        self.negatives = negatives
        self.seed = seed & _MASK32
        self.labels = labels
        self.order = torch.argsort(labels, stable=True)
        self.class_start = torch.cumsum(counts, 0) - counts
        self.class_count = counts

    def to(self, device: torch.device) -> "NegativeSampler":
        for name in ("labels", "order", "class_start", "class_count"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def draw(self, index: torch.Tensor, draw: int) -> torch.Tensor:
        """(B, K+1) sample indices: column 0 the sample itself, then K negatives of other classes."""
        if self.labels.device != index.device:
            self.to(index.device)
        index = index.long()
        n = self.labels.numel()
        cls = self.labels[index]
        other = (n - self.class_count[cls])[:, None]
        key = _hash32(index ^ (self.seed ^ _hash32(draw & _MASK32)))
        key2 = _hash32((key + 0x9E3779B9) & _MASK32)
        cols = torch.arange(1, self.negatives + 1, device=index.device)
        u = _hash32(_hash32(key[:, None] ^ cols[None, :]) ^ key2[:, None]) % other
        pos = u + (u >= self.class_start[cls][:, None]) * self.class_count[cls][:, None]
        return torch.cat([index[:, None], self.order[pos]], 1)


def momentum_rows(old: torch.Tensor, new: torch.Tensor, momentum: float) -> torch.Tensor:
    """normalize(m·old + (1-m)·new): CRD's bank update."""
    return F.normalize(old * momentum + new * (1.0 - momentum), dim=1)


def _check_bank_args(num_samples: int, labels: Any, momentum: float) -> None:
    if len(labels) != num_samples:
        raise ValueError(f"momentum memory: {len(labels)} labels for {num_samples} samples")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")


class MomentumMemory(Memory):
    """Both banks whole on this process: the single-process memory, `local` and `replicated` modes.

    `gather`: update the banks with the global batch gathered from all ranks (replicated);
    otherwise only with this rank's samples (local: the reference's per-GPU memories).
    """

    def __init__(self, num_samples: int, dim: int, negatives: int, labels: Any, seed: int = 0,
                 momentum: float = 0.5, gather: bool = False, per_rank: bool = False) -> None:
        super().__init__()
        if num_samples <= 0 or dim <= 0:
            raise ValueError(f"momentum memory needs a positive sample count and dim, got {num_samples}×{dim}")
        _check_bank_args(num_samples, labels, momentum)
        self.sampler = NegativeSampler(labels, negatives, seed)
        self.momentum, self.gather, self.per_rank = momentum, gather, per_rank
        self.num_samples = num_samples
        self.group = new_group() if gather else None
        self.register_buffer("bank_s", unit_rows(seed, 0, num_samples, dim, stream=1))
        self.register_buffer("bank_t", unit_rows(seed, 0, num_samples, dim, stream=2))
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))

    def soft_cross_entropy(self, z_s: torch.Tensor, z_t: torch.Tensor, tau_s: float, tau_t: float,
                           index: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=z_s.device.type, enabled=False):
            contrast = self.sampler.draw(index, int(self.draws))
            rows_t = self.bank_t[contrast]  # B×(K+1)×D
            rows_s = self.bank_s[contrast]
            logits_s = torch.bmm(rows_t, z_s.float().unsqueeze(2)).squeeze(2) / tau_s
            with torch.no_grad():
                p_t = F.softmax(torch.bmm(rows_s, z_t.float().unsqueeze(2)).squeeze(2) / tau_t, dim=1)
            return -(p_t * F.log_softmax(logits_s, dim=1)).sum(1)

    @torch.no_grad()
    def update(self, z_s: torch.Tensor, z_t: torch.Tensor, index: torch.Tensor) -> None:
        if self.gather:
            z_s, z_t = all_gather_rows(z_s.float(), self.group), all_gather_rows(z_t.float(), self.group)
            index = all_gather_rows(index, self.group)
        index = index.long()
        # Out of place: the loss above may still hold the old banks for backward.
        self.bank_s = self.bank_s.index_copy(0, index, momentum_rows(self.bank_s[index], z_s.float(), self.momentum))
        self.bank_t = self.bank_t.index_copy(0, index, momentum_rows(self.bank_t[index], z_t.float(), self.momentum))

    def loss(self, z_s: torch.Tensor, z_t: torch.Tensor, batch: Batch, tau_s: float, tau_t: float,
             enqueue: str) -> torch.Tensor:
        out = self.soft_cross_entropy(z_s, z_t, tau_s, tau_t, batch.index)
        self.update(z_s.detach(), z_t.detach(), batch.index)
        self.draws += 1
        return out

    def row_shards(self) -> dict[str, RowShard]:
        n = self.num_samples
        return {name: RowShard(0, n, n, replicated=self.gather, per_rank=self.per_rank) for name in ("bank_s", "bank_t")}


class ShardedSampledCrossEntropy(torch.autograd.Function):
    """Per-sample soft cross-entropy over K+1 sampled rows each, the rows spread over ranks.

    Each rank scores the entries (global sample, local row) routed to it, i.e. those whose
    row it owns; per-sample max and sums are all-reduced as in
    `memory_sharded.ShardedSoftCrossEntropy`.
    """

    @staticmethod
    def forward(ctx, zs_all: torch.Tensor, zt_all: torch.Tensor, sample: torch.Tensor,  # type: ignore[override]
                rows: torch.Tensor, bank_t: torch.Tensor, bank_s: torch.Tensor, tau_s: float, tau_t: float,
                lo: int, hi: int, group: Group) -> torch.Tensor:
        b = zs_all.shape[0]
        s = torch.empty(sample.numel(), device=zs_all.device)
        t = torch.empty_like(s)
        for c in range(0, sample.numel(), _CHUNK):
            i, r = sample[c : c + _CHUNK], rows[c : c + _CHUNK]
            s[c : c + _CHUNK] = (zs_all[i] * bank_t[r]).sum(1) / tau_s
            t[c : c + _CHUNK] = (zt_all[i] * bank_s[r]).sum(1) / tau_t
        big = torch.full((2, b), float("-inf"), device=zs_all.device)
        big[0].scatter_reduce_(0, sample, s, "amax")
        big[1].scatter_reduce_(0, sample, t, "amax")
        all_reduce_(big, "max", group)
        e_t = (t - big[1][sample]).exp_()
        e_s = (s - big[0][sample]).exp_()
        sums = torch.zeros(3, b, device=zs_all.device)
        sums[0].index_add_(0, sample, e_s)
        sums[1].index_add_(0, sample, e_t)
        sums[2].index_add_(0, sample, e_t * s)
        all_reduce_(sums, "sum", group)
        loss = big[0] + sums[0].log() - sums[2] / sums[1]
        kernel = e_s.div_(sums[0][sample]).sub_(e_t.div_(sums[1][sample]))
        ctx.save_for_backward(kernel, sample, rows, bank_t)
        ctx.tau_s, ctx.group, ctx.batch = tau_s, group, b
        return loss[lo:hi].clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        kernel, sample, rows, bank_t = ctx.saved_tensors
        grad_all = all_gather_rows(grad.contiguous(), ctx.group)
        coef = kernel * grad_all[sample] / ctx.tau_s
        grad_zs = torch.zeros(ctx.batch, bank_t.shape[1], device=bank_t.device)
        for c in range(0, sample.numel(), _CHUNK):
            grad_zs.index_add_(0, sample[c : c + _CHUNK], coef[c : c + _CHUNK, None] * bank_t[rows[c : c + _CHUNK]])
        return (grad_zs,) + (None,) * 10


class ShardedMomentumMemory(Memory):
    """This rank's N/W rows of both banks, the loss exact over all ranks (see the module docstring)."""

    def __init__(self, num_samples: int, dim: int, negatives: int, labels: Any, seed: int = 0,
                 momentum: float = 0.5) -> None:
        super().__init__()
        self.group = new_group()
        rank, size = world()
        if num_samples < size:
            raise ValueError(f"momentum memory of {num_samples} rows cannot be split over {size} processes")
        _check_bank_args(num_samples, labels, momentum)
        self.sampler = NegativeSampler(labels, negatives, seed)
        self.momentum, self.rank, self.num_samples = momentum, rank, num_samples
        self.start, self.stop = row_range(num_samples, size, rank)
        self.starts = torch.tensor([row_range(num_samples, size, r)[0] for r in range(size)])
        self.register_buffer("bank_s", unit_rows(seed, self.start, self.stop, dim, stream=1))
        self.register_buffer("bank_t", unit_rows(seed, self.start, self.stop, dim, stream=2))
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))

    def loss(self, z_s: torch.Tensor, z_t: torch.Tensor, batch: Batch, tau_s: float, tau_t: float,
             enqueue: str) -> torch.Tensor:
        with torch.autocast(device_type=z_s.device.type, enabled=False):
            zs_all = all_gather_with_grad(z_s.float(), self.group)
            zt_all = all_gather_rows(z_t.float(), self.group)
            index = all_gather_rows(batch.index.long(), self.group)
            sample, rows = self._route(self.sampler.draw(batch.index.long(), int(self.draws)))
            lo = self.rank * z_s.shape[0]
            out = ShardedSampledCrossEntropy.apply(zs_all, zt_all, sample, rows, self.bank_t, self.bank_s,
                                                   tau_s, tau_t, lo, lo + z_s.shape[0], self.group)
            self._update(zs_all.detach(), zt_all, index)
        self.draws += 1
        return out

    def _route(self, contrast: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Send each drawn row index of this rank's samples to the row's owner.

        Returns the entries this rank owns, from every rank: their sample's position in the
        global batch and their row in the local shard.
        """
        b, world_size = contrast.shape[0], len(self.starts)
        starts = self.starts.to(contrast.device)
        owner = (torch.searchsorted(starts, contrast, right=True) - 1).reshape(-1)
        order = torch.argsort(owner, stable=True)  # grouped by owner, then by sample (row-major)
        per_sample = torch.arange(b, device=contrast.device).repeat_interleave(contrast.shape[1])
        counts = torch.bincount(owner * b + per_sample, minlength=world_size * b).view(world_size, b).int()
        got_counts = all_to_all_rows(counts, [1] * world_size, [1] * world_size, self.group)  # [source, sample]
        send, recv = counts.sum(1).tolist(), got_counts.sum(1).tolist()
        rows = all_to_all_rows(contrast.reshape(-1)[order].int(), send, recv, self.group)
        sample = torch.arange(world_size * b, device=contrast.device).repeat_interleave(got_counts.reshape(-1).long())
        return sample, rows.long() - self.start

    @torch.no_grad()
    def _update(self, zs_all: torch.Tensor, zt_all: torch.Tensor, index: torch.Tensor) -> None:
        owned = (index >= self.start) & (index < self.stop)
        rows = index[owned] - self.start
        self.bank_s = self.bank_s.index_copy(0, rows, momentum_rows(self.bank_s[rows], zs_all[owned], self.momentum))
        self.bank_t = self.bank_t.index_copy(0, rows, momentum_rows(self.bank_t[rows], zt_all[owned], self.momentum))

    def row_shards(self) -> dict[str, RowShard]:
        return {name: RowShard(self.start, self.stop, self.num_samples) for name in ("bank_s", "bank_t")}


def _check_samples(spec: MemorySpec) -> None:
    if spec.labels is None:
        raise ValueError("memory 'momentum' needs the training labels, which this run did not provide")


@register_memory("momentum", "local")
def _local_momentum(spec: MemorySpec) -> Memory:
    _check_samples(spec)
    return MomentumMemory(spec.num_samples, spec.dim, spec.size, spec.labels, spec.seed, spec.momentum,
                          gather=False, per_rank=spec.world_size > 1)


@register_memory("momentum", "replicated")
def _replicated_momentum(spec: MemorySpec) -> Memory:
    _check_samples(spec)
    return MomentumMemory(spec.num_samples, spec.dim, spec.size, spec.labels, spec.seed, spec.momentum, gather=True)


@register_memory("momentum", "sharded")
def _sharded_momentum(spec: MemorySpec) -> Memory:
    _check_samples(spec)
    return ShardedMomentumMemory(spec.num_samples, spec.dim, spec.size, spec.labels, spec.seed, spec.momentum)
