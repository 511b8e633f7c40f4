"""Memories of two N×D banks indexed by training sample, scored on K sampled negatives per sample.

CRD's memory (`memory/contrast.py`) and RRD's momentum variant (`method.options.rrd.memory:
momentum`, here) share all but the per-sample reduction. `bank_s` holds student embeddings
and `bank_t` teacher embeddings, each row updated as normalize(m·row + (1-m)·z), m = 0.5,
whenever its sample is in a batch (after the loss, as in CRD). For each sample K+1 rows are
compared: column 0 is the sample's own row, columns 1..K are negatives drawn uniformly, with
replacement, from samples of *other* classes (CRD's "exact" sampling). As in CRD, the
student's embedding is scored against the teacher bank and the teacher's against the student
bank: s_ij = z_s,i · bank_t[c_ij] / tau_s and t_ij = z_t,i · bank_s[c_ij] / tau_t.
`SampleBanks.loss` is draw -> score against the rows' owner -> per-sample reduction -> update;
a subclass supplies the reduction (and the initial rows):
- `MomentumMemory` (RRD): L_i = -sum_j softmax(t_i)_j log softmax(s_i)_j, the target
  detached. Unlike the RRD reference, these are plain scaled cosine similarities as in the
  FIFO variant; the reference feeds CRD's NCE scores exp(x/0.07)/Z into the softmax instead.
- `ContrastMemory` (CRD): a sum of independent per-entry NCE terms.

Negatives are a pure function of (seed, step counter, sample index, column), computed
with a counter-based hash: any rank can compute any sample's negatives, the draw does not
depend on how the batch is split, and a resumed run draws what an uninterrupted one would.

Modes (`distributed.memory_sharding`): `local` keeps whole banks fed by this rank's samples
only (the reference's per-GPU memories); `replicated` keeps whole banks on every rank,
updated with the gathered global batch; `sharded` splits them by sample index: rank r owns
rows [a_r, b_r) of both banks, N/W rows each. Sharded, the scores are computed where the
rows live; rows are never fetched. Each rank draws the negatives of its own b samples and
sends every drawn row *index* (4 bytes) to the rank that owns the row; every rank has the
global batch's z_s and z_t (an all-gather of B×D numbers), scores the entries it received
against its own rows, and the per-sample statistics are all-reduced. Fetching rows instead
would move b·(K+1)·D floats per bank per rank and step (at b=256, K=16384, D=128: 2.1 GB
per bank) where the index exchange moves b·(K+1) int32 (16.8 MB); the multiply-adds split
evenly across ranks either way, and the update needs no traffic since each owner already
holds the gathered embeddings of the samples whose rows it owns. In every mode the entries
are one flat list of (sample, row) pairs scored in chunks, so one code path serves one
process and W ranks, and no B×(K+1)×D tensor of gathered rows is ever built.

A compiled step (or `static_exchange = True`) cannot exchange the indices: how many entries each
owner receives depends on the draws, and NCCL's all-to-all takes its split sizes from the host.
There every rank draws the negatives of the whole global batch itself (the draws are a pure function
of the sample index, so they are the same ones) and keeps, at fixed shapes, the entries whose rows it
owns; the others point at a padding slot past the batch whose zero embedding and statistics are
dropped. No host read, no graph break, no all-to-all, the same losses up to summation order; the
price is that every rank gathers and scores B·(K+1) entries instead of about B·(K+1)/W.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.batch import Batch
from rrd_fast.memory.collectives import (Group, all_gather_rows, all_gather_with_grad, all_reduce_, all_to_all_rows, new_group,
                                  row_range, world)
from rrd_fast.memory.base import Memory, MemorySpec, RowShard, masked_index_copy_, register_memory, unit_rows

_MASK32 = 0xFFFFFFFF
_CHUNK = 1 << 16  # sampled entries scored at a time: bounds the E×D temporaries of the loss


def _hash32(x: torch.Tensor | int) -> torch.Tensor | int:
    """A 32-bit integer mixer for ints or int64 tensors with values in [0, 2^32); products stay below 2^63."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _MASK32
    return x ^ (x >> 16)


class NegativeSampler(nn.Module):
    """Draws K other-class negatives per sample as a pure function of (seed, draw, index, column).

    Samples are kept sorted by class; a uniform position among the N - n_c samples of other
    classes skips over the block of the sample's own class c. The label tables are
    non-persistent buffers, so they follow the memory to its device and stay out of its state.
    """

    def __init__(self, labels: Any, negatives: int, seed: int) -> None:
        super().__init__()
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
        tables = {"labels": labels, "order": torch.argsort(labels, stable=True),
                  "class_start": torch.cumsum(counts, 0) - counts, "class_count": counts}
        for name, table in tables.items():
            self.register_buffer(name, table, persistent=False)

    def draw(self, index: torch.Tensor, draw: torch.Tensor | int) -> torch.Tensor:
        """(B, K+1) sample indices: column 0 the sample itself, then K negatives of other classes.

        `draw` (the step counter) may be a device tensor, so a compiled step reads no host value.
        """
        if self.labels.device != index.device:
            self.to(index.device)
        index = index.long()
        n = self.labels.numel()
        cls = self.labels[index]
        other = (n - self.class_count[cls])[:, None]
        key = _hash32(index ^ (_hash32(draw & _MASK32) ^ self.seed))
        key2 = _hash32((key + 0x9E3779B9) & _MASK32)
        cols = torch.arange(1, self.negatives + 1, device=index.device)
        u = _hash32(_hash32(key[:, None] ^ cols[None, :]) ^ key2[:, None]) % other
        pos = u + (u >= self.class_start[cls][:, None]) * self.class_count[cls][:, None]
        return torch.cat([index[:, None], self.order[pos]], 1)


def momentum_rows(old: torch.Tensor, new: torch.Tensor, momentum: float) -> torch.Tensor:
    """normalize(m·old + (1-m)·new): CRD's bank update."""
    return F.normalize(old * momentum + new * (1.0 - momentum), dim=1)


def reduce_(x: torch.Tensor, op: str, group: Group) -> torch.Tensor:
    """All-reduce over a memory's private group; nothing when the memory is this rank's alone (group None)."""
    return x if group is None else all_reduce_(x, op, group)


def _gather(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Every rank's rows in rank order (differentiably if `x` requires grad); `x` itself when group is None."""
    if group is None:
        return x
    return all_gather_with_grad(x, group) if x.requires_grad else all_gather_rows(x, group)


def _padded(z: torch.Tensor) -> torch.Tensor:
    """z with one zero row appended: the padding slot that entries owned elsewhere point at."""
    return torch.cat([z, z.new_zeros(1, z.shape[1])])


def _dots(z: torch.Tensor, bank: torch.Tensor, sample: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """z[sample_e] · bank[rows_e] for every entry e, _CHUNK entries at a time."""
    out = z.new_empty(sample.numel())
    for c in range(0, sample.numel(), _CHUNK):
        out[c : c + _CHUNK] = (z[sample[c : c + _CHUNK]] * bank[rows[c : c + _CHUNK]].to(z.dtype)).sum(1)
    return out


def _scatter(coef: torch.Tensor, sample: torch.Tensor, rows: torch.Tensor, bank: torch.Tensor,
             batch: int) -> torch.Tensor:
    """sum over entries e of sample i of coef_e · bank[rows_e]: the gradient of `_dots` w.r.t. z."""
    out = coef.new_zeros(batch, bank.shape[1])
    for c in range(0, sample.numel(), _CHUNK):
        part = slice(c, c + _CHUNK)
        out.index_add_(0, sample[part], coef[part, None] * bank[rows[part]].to(coef.dtype))
    return out


# (s, t, sample, positive, batch, group) -> (per-sample loss of the batch, dL/ds per entry, dL/dt per entry or None).
# Entries with sample == batch are padding (owned by another rank): a reduction keeps batch + 1 slots and
# drops the last.
Reduction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, Group],
                     tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]


class SampledLoss(torch.autograd.Function):
    """Per-sample losses over sampled (sample, row) entries, the rows possibly spread over ranks.

    Scores each entry against the bank rows held here (s against bank_t, t against bank_s),
    hands them to the memory's reduction, which all-reduces whatever per-sample statistics it
    needs over `group`, and returns the losses of samples lo..hi-1. Backward gathers every
    rank's incoming per-sample gradient and adds, for each entry held here, its part of
    dL/dz_s (and dL/dz_t when the reduction trains the teacher side); the all-gathers'
    backward then sums these parts onto the rank that owns each sample.
    """

    @staticmethod
    def forward(ctx, zs_all: torch.Tensor, zt_all: torch.Tensor, sample: torch.Tensor,  # type: ignore[override]
                rows: torch.Tensor, positive: torch.Tensor, bank_t: torch.Tensor, bank_s: torch.Tensor, tau_s: float,
                tau_t: float, reduction: Reduction, lo: int, hi: int, group: Group) -> torch.Tensor:
        batch = zs_all.shape[0]
        s = _dots(_padded(zs_all), bank_t, sample, rows).div_(tau_s)
        t = _dots(_padded(zt_all), bank_s, sample, rows).div_(tau_t)
        loss, kernel_s, kernel_t = reduction(s, t, sample, positive, batch, group)
        # This rank's part of dL_i/dz (B×D), formed now so that backward needs no bank rows: the
        # banks are updated in place right after the loss.
        grad_zs = _scatter(kernel_s / tau_s, sample, rows, bank_t, batch + 1)[:batch]
        grad_zt = None if kernel_t is None else _scatter(kernel_t / tau_t, sample, rows, bank_s, batch + 1)[:batch]
        ctx.save_for_backward(grad_zs, grad_zt)
        ctx.group = group
        return loss[lo:hi].clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad_zs, grad_zt = ctx.saved_tensors
        grad_all = (grad if ctx.group is None else all_gather_rows(grad.contiguous(), ctx.group))[:, None]
        grad_zt = None if grad_zt is None else grad_all * grad_zt
        return (grad_all * grad_zs, grad_zt) + (None,) * 11


MODES = ("local", "replicated", "sharded")


def _check_bank_args(num_samples: int, labels: Any, momentum: float, mode: str) -> None:
    if num_samples <= 0:
        raise ValueError(f"a memory indexed by sample needs a positive sample count, got {num_samples}")
    if len(labels) != num_samples:
        raise ValueError(f"memory indexed by sample: {len(labels)} labels for {num_samples} samples")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if mode not in MODES:
        raise ValueError(f"unknown memory sharding {mode!r} (known: {', '.join(MODES)})")


class SampleBanks(Memory):
    """Both banks (this rank's rows of them), the draws and the update; the reduction is the subclass's.

    `mode` is the sharding mode (see the module docstring); `per_rank` marks local banks that
    are one of several unsynchronised per-process copies (for resume).
    """

    def __init__(self, num_samples: int, dim: int, negatives: int, labels: Any, seed: int = 0,
                 momentum: float = 0.5, mode: str = "local", per_rank: bool = False) -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError(f"memory dim must be positive, got {dim}")
        _check_bank_args(num_samples, labels, momentum, mode)
        self.sampler = NegativeSampler(labels, negatives, seed)
        self.momentum, self.mode, self.per_rank, self.num_samples = momentum, mode, per_rank, num_samples
        self.group = new_group() if mode != "local" else None  # collective: every rank builds the same memories
        self.loss_group = self.group if mode == "sharded" else None  # only sharded losses need other ranks
        self.rank, size = world() if self.loss_group is not None else (0, 1)
        if num_samples < size:
            raise ValueError(f"a memory of {num_samples} rows cannot be split over {size} processes")
        self.start, self.stop = row_range(num_samples, size, self.rank)
        self.starts = torch.tensor([row_range(num_samples, size, r)[0] for r in range(size)])
        self.register_buffer("bank_s", self.initial_rows(seed, self.start, self.stop, dim, stream=1))
        self.register_buffer("bank_t", self.initial_rows(seed, self.start, self.stop, dim, stream=2))
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))
        self.static_exchange = False  # sharded: the fixed-shape path even when not compiling (see the module docstring)

    @staticmethod
    def initial_rows(seed: int, start: int, stop: int, dim: int, stream: int) -> torch.Tensor:
        return unit_rows(seed, start, stop, dim, stream)

    def reduce(self, s: torch.Tensor, t: torch.Tensor, sample: torch.Tensor, positive: torch.Tensor, batch: int,
               group: Group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Per-sample losses of the `batch` samples from their entries here (see `Reduction`)."""
        raise NotImplementedError

    def loss(self, z_s: torch.Tensor, z_t: torch.Tensor, batch: Batch, tau_s: float, tau_t: float,
             enqueue: str) -> torch.Tensor:
        """Draw -> score against the rows' owner -> per-sample reduction -> update (`enqueue`: always after)."""
        with torch.autocast(device_type=z_s.device.type, enabled=False):
            dtype = torch.promote_types(torch.promote_types(z_s.dtype, self.bank_t.dtype), torch.float32)
            z_s, z_t, index = z_s.to(dtype), z_t.to(dtype), batch.index.to(z_s.device).long()
            contrast = self.sampler.draw(index, self.draws)
            group = self.loss_group
            zs_all, zt_all, index_all = _gather(z_s, group), _gather(z_t, group), _gather(index, group)
            if group is None:
                sample = torch.arange(len(index), device=index.device).repeat_interleave(contrast.shape[1])
                rows = contrast.reshape(-1)
            elif self.static_exchange or torch.compiler.is_compiling():
                sample, rows = self._owned_entries(index_all)
            else:
                sample, rows = self._route(contrast)
            positive = rows + self.start == torch.cat([index_all, index_all.new_full((1,), -1)])[sample]
            lo = self.rank * len(index)
            out = SampledLoss.apply(zs_all, zt_all, sample, rows, positive, self.bank_t, self.bank_s, tau_s, tau_t,
                                    self.reduce, lo, lo + len(index), group)
            if self.mode == "replicated":
                zs_all, zt_all, index_all = (_gather(x.detach(), self.group) for x in (z_s, z_t, index))
            self._update(zs_all.detach(), zt_all.detach(), index_all)
        self.draws.add_(1)
        return out

    def _owned_entries(self, index_all: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The global batch's entries at a fixed shape, B·(K+1): those whose rows this rank owns with their
        sample's position and local row, the others pointing at the padding slot B and row 0."""
        contrast = self.sampler.draw(index_all, self.draws)
        owned = (contrast >= self.start) & (contrast < self.stop)
        position = torch.arange(len(index_all), device=index_all.device)[:, None]
        sample = torch.where(owned, position, len(index_all)).reshape(-1)
        return sample, torch.where(owned, contrast - self.start, 0).reshape(-1)

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
    def _update(self, z_s: torch.Tensor, z_t: torch.Tensor, index: torch.Tensor) -> None:
        """Momentum update of the rows this rank owns among `index`: in place and static-shape (the loss
        keeps its gradients, not the bank rows, for backward)."""
        owned = (index >= self.start) & (index < self.stop)
        rows = torch.where(owned, index - self.start, 0)
        for name, z in (("bank_s", z_s), ("bank_t", z_t)):
            bank = getattr(self, name)
            masked_index_copy_(bank, rows, momentum_rows(bank[rows], z.to(bank.dtype), self.momentum), owned)

    def row_shards(self) -> dict[str, RowShard]:
        shard = RowShard(self.start, self.stop, self.num_samples, replicated=self.mode == "replicated",
                         per_rank=self.per_rank)
        return {"bank_s": shard, "bank_t": shard}


class MomentumMemory(SampleBanks):
    """RRD's reduction: per-sample soft cross-entropy over the K+1 entries, the target detached.

    Per-sample max and sums are all-reduced as in `fifo_sharded.ShardedSoftCrossEntropy`.
    """

    def reduce(self, s: torch.Tensor, t: torch.Tensor, sample: torch.Tensor, positive: torch.Tensor, batch: int,
               group: Group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        big = s.new_full((2, batch + 1), float("-inf"))
        big[0].scatter_reduce_(0, sample, s, "amax")
        big[1].scatter_reduce_(0, sample, t, "amax")
        reduce_(big, "max", group)
        e_t = (t - big[1][sample]).exp_()
        e_s = (s - big[0][sample]).exp_()
        sums = s.new_zeros(3, batch + 1)
        sums[0].index_add_(0, sample, e_s)
        sums[1].index_add_(0, sample, e_t)
        sums[2].index_add_(0, sample, e_t * s)
        reduce_(sums, "sum", group)
        loss = (big[0] + sums[0].log() - sums[2] / sums[1])[:batch]
        kernel = e_s.div_(sums[0][sample]).sub_(e_t.div_(sums[1][sample]))  # softmax_s - p_t
        return loss, kernel, None


def _build(cls: type[SampleBanks], kind: str, mode: str, spec: MemorySpec) -> Memory:
    if spec.labels is None:
        raise ValueError(f"memory {kind!r} needs the training labels, which this run did not provide")
    return cls(spec.num_samples, spec.dim, spec.size, spec.labels, spec.seed, spec.momentum, mode=mode,
               per_rank=mode == "local" and spec.world_size > 1)


def register_banks(kind: str, cls: type[SampleBanks]) -> None:
    """Register memory `kind`, built as `cls`, under every sharding mode."""
    for mode in MODES:
        register_memory(kind, mode)(functools.partial(_build, cls, kind, mode))


register_banks("momentum", MomentumMemory)

