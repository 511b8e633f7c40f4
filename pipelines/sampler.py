"""Which sample indices each rank sees at each step: exact epoch semantics under sharding.

Training (drop_last): the epoch order is cut into global batches of `batch_size * world_size`;
rank r takes its contiguous slice of each. The last `n mod global_batch` samples of the
shuffled order are dropped, so every other sample is seen exactly once across ranks.
Evaluation (no drop): rank r takes order[r::world_size], so every sample is seen exactly
once and no padding is needed; metrics are summed, not averaged, across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.augment import epoch_order


@dataclass(frozen=True)
class EpochSampler:
    n: int
    batch_size: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    shuffle: bool = True
    drop_last: bool = True

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {self.batch_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")
        if self.drop_last and self.n < self.global_batch:
            raise ValueError(f"dataset of {self.n} samples is smaller than one global batch of {self.global_batch}")

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def order(self, epoch: int) -> np.ndarray:
        return epoch_order(self.seed, epoch, self.n) if self.shuffle else np.arange(self.n, dtype=np.int64)

    def __len__(self) -> int:
        if self.drop_last:
            return self.n // self.global_batch
        mine = len(range(self.rank, self.n, self.world_size))
        return -(-mine // self.batch_size)

    def batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's index arrays for every step of `epoch`."""
        order = self.order(epoch)
        if self.drop_last:
            steps = len(self)
            grid = order[: steps * self.global_batch].reshape(steps, self.world_size, self.batch_size)
            return list(grid[:, self.rank])
        mine = order[self.rank :: self.world_size]
        return [mine[i : i + self.batch_size] for i in range(0, len(mine), self.batch_size)]
