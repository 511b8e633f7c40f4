"""Vectorised torch pipeline for in-memory datasets.

The whole split lives as one zero-padded uint8 NHWC tensor on the training device. A
batch is a single gather (crop and flip folded into the gather's pixel indices), one
dtype conversion and one fused normalisation: no per-sample Python at all.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

from pipelines.augment import CropFlipSpec
from pipelines.batch import Batch
from pipelines.sampler import EpochSampler


class ArrayPipeline:
    """Yields `Batch`es of one in-memory split, augmented (train) or only normalised (eval)."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        sampler: EpochSampler,
        mean: Sequence[float],
        std: Sequence[float],
        augment: CropFlipSpec | None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 N×H×W×C, got {images.dtype} {images.shape}")
        self.sampler = sampler
        self.augment = augment
        self.device = torch.device(device)
        self.dtype = dtype
        n, h, w, c = images.shape
        self.height, self.width, self.channels = h, w, c
        self.pad = augment.pad if augment is not None else 0
        p = self.pad
        padded = np.zeros((n, c, h + 2 * p, w + 2 * p), dtype=np.uint8)
        padded[:, :, p : p + h, p : p + w] = images.transpose(0, 3, 1, 2)
        self._pixels = torch.from_numpy(padded).to(self.device)
        self._labels = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(self.device)
        self._scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=self.device, dtype=dtype).view(1, c, 1, 1)
        self._shift = torch.tensor([m / s for m, s in zip(mean, std)], device=self.device, dtype=dtype).view(1, c, 1, 1)

    def __len__(self) -> int:
        return len(self.sampler)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """Batches of `epoch` from `start_step` on: a pure function of (seed, epoch)."""
        for index in self.sampler.batches(epoch)[start_step:]:
            yield self.batch_for(index, epoch)

    def aug_params(self, index: np.ndarray, epoch: int) -> np.ndarray:
        if self.augment is None:
            return np.zeros((len(index), 3), dtype=np.int32)
        return self.augment.params(self.sampler.seed, epoch, index)

    def batch_for(self, index: np.ndarray, epoch: int) -> Batch:
        """Regenerate the exact batch for these sample indices at this augmentation epoch."""
        params = self.aug_params(index, epoch)
        idx = torch.from_numpy(np.asarray(index, dtype=np.int64)).to(self.device)
        aug = torch.from_numpy(params).to(self.device)
        images = self._crop_flip(self._pixels.index_select(0, idx), aug)
        images = images.to(self.dtype).mul_(self._scale).sub_(self._shift)
        return Batch(images=images, labels=self._labels[idx], index=idx, aug=aug, epoch=epoch)

    def _crop_flip(self, padded: torch.Tensor, aug: torch.Tensor) -> torch.Tensor:
        """All crops and flips of a batch as one strided-window gather.

        A flipped crop at offset dx equals the crop at offset 2*pad - dx of the flipped
        image, so the batch and its mirror are stacked and each sample picks its window.
        """
        b, c, ph, pw = padded.shape
        if self.pad == 0 and not bool(aug[:, 2].any()):
            return padded
        span = 2 * self.pad + 1
        both = torch.cat([padded, padded.flip(3)])
        sb, sc, sh, sw = both.stride()
        windows = both.as_strided((2 * b, span, span, c, self.height, self.width), (sb, sh, sw, sc, sh, sw))
        dy, dx, flip = aug[:, 0].long(), aug[:, 1].long(), aug[:, 2].long()
        rows = torch.arange(b, device=padded.device) + flip * b
        return windows[rows, dy, torch.where(flip.bool(), 2 * self.pad - dx, dx)]
