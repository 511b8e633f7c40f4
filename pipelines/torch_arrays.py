"""Vectorised torch pipeline for in-memory datasets.

The whole split lives as one zero-padded uint8 NCHW tensor on the training device, next
to a horizontally mirrored copy when flips are on. A random crop of either copy is then
a plain strided window that starts at one byte offset, so a whole batch (crop and flip
included) is a single `index_select` of B windows, then one conversion to fp32 and an
in-place normalisation (rounded once to a half-precision output): no per-sample Python
and no per-pixel index arithmetic.
Augmentation parameters are looked up in a per-epoch table (they are a pure function
of (seed, epoch, index), so the table is exact and cheap to rebuild).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from pipelines.augment import CropFlipSpec
from pipelines.base import BasePipeline
from pipelines.batch import Batch
from pipelines.normalize import Normalizer
from pipelines.sampler import EpochSampler

# The mirrored copy doubles the padded split's memory; above this size batches are cropped
# and flipped by a per-pixel gather instead (same output, several times slower).
MAX_MIRROR_BYTES = 2 << 30
# Epoch parameter tables kept (a teacher cache or resume may revisit recent epochs).
PARAM_TABLES_KEPT = 2


class ArrayPipeline(BasePipeline):
    """Yields `Batch`es of one in-memory split, augmented (train) or only normalised (eval)."""

    augment_type = CropFlipSpec

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
        super().__init__(labels, sampler, augment, device, dtype)
        n, h, w, c = images.shape
        self.size = n
        self.height, self.width, self.channels = h, w, c
        self.pad = augment.pad if augment is not None else 0
        p = self.pad
        flips = augment is not None and augment.flip
        padded_bytes = n * c * (h + 2 * p) * (w + 2 * p)
        self.mirrored = flips and 2 * padded_bytes <= MAX_MIRROR_BYTES
        copies = 2 if self.mirrored else 1
        padded = np.zeros((copies * n, c, h + 2 * p, w + 2 * p), dtype=np.uint8)
        padded[:n, :, p : p + h, p : p + w] = images.transpose(0, 3, 1, 2)
        if self.mirrored:
            padded[n:] = padded[:n, :, :, ::-1]
        self._pixels = torch.from_numpy(padded).to(self.device)
        self._normalize = Normalizer(mean, std, self.device, dtype)
        self._windows = self._window_view(self._pixels)
        self._tables: tuple[tuple[int, np.ndarray], ...] = ()  # (epoch, table), newest first

    def _window_view(self, pixels: torch.Tensor) -> torch.Tensor:
        """Every C×H×W window of the flat storage, indexed by its first byte (overlapping, no copy)."""
        _, c, ph, pw = pixels.shape
        h, w = self.height, self.width
        extent = (c - 1) * ph * pw + (h - 1) * pw + w
        return pixels.as_strided((pixels.numel() - extent + 1, c, h, w), (1, ph * pw, pw, 1))

    def _params(self, index: np.ndarray, epoch: int) -> np.ndarray:
        """int32 B×3 (dy, dx, flip), read from the epoch's table: identical to `augment.params`."""
        assert self.augment is not None
        if index.size and (index.min() < 0 or index.max() >= self.size):
            raise IndexError(f"sample index out of range 0..{self.size - 1}")
        tables = self._tables
        table = next((t for e, t in tables if e == epoch), None)
        if table is None:
            table = self.augment.params(self.sampler.seed, epoch, np.arange(self.size))
            # One reference swap: safe if another thread reads the tables meanwhile.
            self._tables = ((epoch, table),) + tables[: PARAM_TABLES_KEPT - 1]
        return table[index]

    def batch_for(self, index: np.ndarray, epoch: int) -> Batch:
        """Regenerate the exact batch for these sample indices at this augmentation epoch."""
        index = np.asarray(index, dtype=np.int64)
        params = self.aug_params(index, epoch)
        idx = torch.from_numpy(index).to(self.device)
        aug = torch.from_numpy(params).to(self.device)
        if self.augment is None:
            crops = self._pixels.index_select(0, idx)
        elif self.mirrored or not params[:, 2].any():
            crops = self._windows.index_select(0, torch.from_numpy(self._window_starts(index, params)).to(self.device))
        else:
            crops = self._gather_crop_flip(self._pixels.index_select(0, idx), aug)
        return self._batch(self._normalize(crops), idx, aug, epoch)

    def _window_starts(self, index: np.ndarray, params: np.ndarray) -> np.ndarray:
        """First byte of each sample's crop window.

        A flipped crop at offset dx equals the crop at offset 2*pad - dx of the mirrored
        image, which is stored `size` images after the original.
        """
        _, c, ph, pw = self._pixels.shape
        dy, dx, flip = (params[:, k].astype(np.int64) for k in range(3))
        if self.mirrored:
            index = index + flip * self.size
            dx = np.where(flip == 1, 2 * self.pad - dx, dx)
        return index * (c * ph * pw) + dy * pw + dx

    def _gather_crop_flip(self, padded: torch.Tensor, aug: torch.Tensor) -> torch.Tensor:
        """Fallback without a mirrored copy: all crops and flips of a batch as one strided gather.

        The batch and its mirror are stacked and each sample picks its window.
        """
        b, c, ph, pw = padded.shape
        span = 2 * self.pad + 1
        both = torch.cat([padded, padded.flip(3)])
        sb, sc, sh, sw = both.stride()
        windows = both.as_strided((2 * b, span, span, c, self.height, self.width), (sb, sh, sw, sc, sh, sw))
        dy, dx, flip = aug[:, 0].long(), aug[:, 1].long(), aug[:, 2].long()
        rows = torch.arange(b, device=padded.device) + flip * b
        return windows[rows, dy, torch.where(flip.bool(), 2 * self.pad - dx, dx)]
