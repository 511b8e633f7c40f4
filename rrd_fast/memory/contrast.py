"""CRD's memory: RepDistiller's crd/memory.py ContrastMemory with crd/criterion.py ContrastLoss.

The banks, negatives, sharding and update are the shared sample banks (`memory/momentum.py`);
only the reduction and the initial rows are CRD's. Each entry's score is x = exp(s) / Z with
s = bank·z / T (T = 0.07, passed as both temperatures). Z, one per direction, is estimated
once, on the first batch, as mean(exp(s)) · N and then fixed, as in the reference; when
several ranks share the memory it is the *global* batch's mean, so W processes equal one.
The loss of sample i is NCE with the uniform noise Pn = 1/N over its K+1 entries,
  L_i = -log(x_i0 / (x_i0 + K·Pn + eps)) - sum_{j>=1} log(K·Pn / (x_ij + K·Pn + eps)),  eps = 1e-7,
summed over both directions: a sum of independent per-entry terms, so sharded it needs one
all-reduced sum per sample. The reference divides the batch's sum by its batch size; here the
memory returns per-sample losses and the term averages them (DDP's average of the per-rank
means is then the global batch's loss).

Initial rows are uniform in [-stdv, stdv], stdv = 1/sqrt(D/3), and not normalised until first
updated, as in the reference; they are drawn block-wise from the seed (`memory.random_rows`),
so a sharded memory starts out equal to the single-process one. Z lives in `z_norm`
([student direction, teacher direction], -1 while unset) and is saved with the resume state.
"""

from __future__ import annotations

import math

import torch

from rrd_fast.memory.collectives import Group
from rrd_fast.memory.base import RowShard, random_rows
from rrd_fast.memory.momentum import SampleBanks, reduce_, register_banks

EPS = 1e-7  # crd/criterion.py


class ContrastMemory(SampleBanks):
    """CRD's banks and NCE reduction; `z_norm` holds the two normalisers Z."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.register_buffer("z_norm", torch.full((2,), -1.0))

    @staticmethod
    def initial_rows(seed: int, start: int, stop: int, dim: int, stream: int) -> torch.Tensor:
        stdv = 1.0 / math.sqrt(dim / 3)
        return random_rows(seed, start, stop, dim, stream, uniform=True).mul_(2 * stdv).add_(-stdv)

    def reduce(self, s: torch.Tensor, t: torch.Tensor, sample: torch.Tensor, positive: torch.Tensor, batch: int,
               group: Group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        e = torch.stack([s, t]).exp_()
        # Z = mean score × N over every rank's entries (padding excluded), kept from the first batch on
        # (z_norm < 0 until then). Formed at every step and selected on the device, so the step has no
        # data-dependent branch.
        real = sample < batch
        count = real.sum().to(e.dtype).reshape(1)
        stats = reduce_(torch.cat([torch.where(real, e, 0).sum(1), count]), "sum", self.group)
        first = (stats[:2] / stats[2] * self.num_samples).to(self.z_norm.dtype)
        self.z_norm.copy_(torch.where(self.z_norm < 0, first, self.z_norm))
        x = e.div_(self.z_norm.to(e.dtype)[:, None])
        noise = self.sampler.negatives * (1.0 / self.num_samples)  # K·Pn, computed as the reference does
        denom = x + (noise + EPS)
        per_entry = torch.where(positive, -(x / denom).log(), -(noise / denom).log())
        kernel = torch.where(positive, -(noise + EPS) / denom, x / denom)  # d per_entry / d s
        loss = s.new_zeros(batch + 1).index_add_(0, sample, per_entry.sum(0))[:batch]
        return reduce_(loss, "sum", group), kernel[0], kernel[1]

    def row_shards(self) -> dict[str, RowShard]:
        # Z is the same on every rank unless each rank keeps its own memory (local mode).
        z = RowShard(0, 2, 2, replicated=self.mode != "local", per_rank=self.per_rank)
        return {**super().row_shards(), "z_norm": z}


register_banks("contrast", ContrastMemory)
