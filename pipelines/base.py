"""What every pipeline backend shares, so that each one only turns a planned batch into pixels.

The sample order comes from the `EpochSampler` and the augmentation parameters from the
augmentation spec, both pure functions of (seed, epoch, index); this class owns them, the
labels, the device and dtype, the length and the `aug_epoch` replay. A backend implements
`batch_for` (one planned batch -> its `Batch`) and, if it reads ahead, `_batches` (a whole
plan), so two backends given the same sampler and spec see the same epochs by construction.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar, Iterator, Sequence

import numpy as np
import torch

from pipelines.augment import AugSpec, CropFlipSpec, ResizedCropSpec
from pipelines.batch import Batch
from pipelines.sampler import EpochSampler
from pipelines.views import CenterCropSpec, CorruptFiles


class BasePipeline(ABC):
    """Yields `Batch`es of one split, augmented (train, `augment` set) or only normalised (eval)."""

    # The spec whose `identity` stands in for the parameters of unaugmented (evaluation) samples.
    augment_type: ClassVar[type[CropFlipSpec] | type[ResizedCropSpec]]

    def __init__(self, labels: np.ndarray, sampler: EpochSampler, augment: AugSpec | None,
                 device: str | torch.device, dtype: torch.dtype) -> None:
        self.sampler = sampler
        self.augment = augment
        self.device = torch.device(device)
        self.dtype = dtype  # of the images it yields
        self._labels = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(self.device)

    def __len__(self) -> int:
        return len(self.sampler)

    def aug_params(self, index: np.ndarray, epoch: int) -> np.ndarray:
        """The augmentation parameters of these samples at augmentation epoch `epoch` (identity for eval)."""
        index = np.asarray(index, dtype=np.int64)
        if self.augment is None:
            return self.augment_type.identity(len(index))
        return self._params(index, epoch)

    def _params(self, index: np.ndarray, epoch: int) -> np.ndarray:
        assert self.augment is not None
        return self.augment.params(self.sampler.seed, epoch, index)

    def epoch(self, epoch: int, start_step: int = 0, aug_epoch: int | None = None) -> Iterator[Batch]:
        """Batches of `epoch` from `start_step` on: a pure function of (seed, epoch).

        `aug_epoch` (default: `epoch`) draws the augmentation of another epoch while keeping
        this epoch's sample order (the teacher cache replays its stored views this way).
        """
        aug = epoch if aug_epoch is None else aug_epoch
        yield from self._batches(self.sampler.batches(epoch)[start_step:], aug)

    def _batches(self, plan: list[np.ndarray], epoch: int) -> Iterator[Batch]:
        """The batches of `plan` at augmentation epoch `epoch`, one at a time; backends that read ahead override it."""
        for index in plan:
            yield self.batch_for(index, epoch)

    @abstractmethod
    def batch_for(self, index: np.ndarray, epoch: int) -> Batch:
        """Regenerate the exact batch for these sample indices at this augmentation epoch."""

    def _batch(self, images: torch.Tensor, index: np.ndarray | torch.Tensor, aug: np.ndarray | torch.Tensor,
               epoch: int) -> Batch:
        """The `Batch` of these images, with their labels; indices and parameters moved to the device if needed."""
        idx = index if isinstance(index, torch.Tensor) else torch.from_numpy(index).to(self.device)
        aug_t = aug if isinstance(aug, torch.Tensor) else torch.from_numpy(aug).to(self.device)
        return Batch(images=images, labels=self._labels[idx], index=idx, aug=aug_t, epoch=epoch)


class FileSplitPipeline(BasePipeline):
    """A pipeline over encoded image files: the paths, the view geometry and the corrupt-file policy."""

    augment_type = ResizedCropSpec

    def __init__(self, paths: Sequence[Path], labels: np.ndarray, sampler: EpochSampler,
                 augment: ResizedCropSpec | None, size: int, center: CenterCropSpec,
                 device: str | torch.device, dtype: torch.dtype, on_corrupt: str) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        super().__init__(labels, sampler, augment, device, dtype)
        self.paths = [Path(p) for p in paths]
        self.size = size
        self.center = center
        self.corrupt = CorruptFiles(on_corrupt)

    @property
    def skipped(self) -> int:
        """Corrupt files skipped so far (policy `skip`)."""
        return self.corrupt.count
