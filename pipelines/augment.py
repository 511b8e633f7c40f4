"""Augmentation parameters as a pure function of (seed, epoch, sample index).

A counter-based hash (splitmix64 finaliser) replaces a stateful RNG stream, so any
batch of any epoch can be regenerated exactly: by the teacher cache, on resume, and by
the DALI backend, which must reproduce the torch backend bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)

# Independent streams of the same (seed, epoch, index) counter.
STREAM_ORDER = 1
STREAM_CROP_Y = 2
STREAM_CROP_X = 3
STREAM_FLIP = 4
STREAM_SCALE = 5
STREAM_RATIO = 6


def _mix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def hash_bits(seed: int, epoch: int, stream: int, index: np.ndarray) -> np.ndarray:
    """64 well-mixed bits per index; changing any input gives unrelated bits."""
    with np.errstate(over="ignore"):
        key = _mix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * _GOLDEN + np.uint64(1))
        key = _mix64(key ^ np.uint64(epoch & 0xFFFFFFFFFFFFFFFF))
        key = _mix64(key ^ (np.uint64(stream) << np.uint64(40)))
        return _mix64(key ^ (np.asarray(index, dtype=np.int64).astype(np.uint64) * _GOLDEN))


def uniform(seed: int, epoch: int, stream: int, index: np.ndarray) -> np.ndarray:
    """Floats in [0, 1) with 53 random bits."""
    return (hash_bits(seed, epoch, stream, index) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The sample visiting order of one epoch: a permutation of range(n)."""
    return np.argsort(hash_bits(seed, epoch, STREAM_ORDER, np.arange(n)), kind="stable").astype(np.int64)


@dataclass(frozen=True)
class CropFlipSpec:
    """CIFAR recipe: zero-pad by `pad`, take a random crop of the original size, flip with p=0.5."""

    pad: int = 4
    flip: bool = True
    kind: Literal["crop_flip"] = "crop_flip"

    @staticmethod
    def identity(n: int) -> np.ndarray:
        """The parameters recorded for `n` unaugmented (evaluation) samples, shaped like `params`."""
        return np.zeros((n, 3), dtype=np.int32)

    def params(self, seed: int, epoch: int, index: np.ndarray) -> np.ndarray:
        """int32 array B×3: (dy, dx, flip); dy, dx in [0, 2*pad] are offsets into the padded image."""
        index = np.asarray(index)
        span = 2 * self.pad + 1
        dy = np.floor(uniform(seed, epoch, STREAM_CROP_Y, index) * span)
        dx = np.floor(uniform(seed, epoch, STREAM_CROP_X, index) * span)
        flip = uniform(seed, epoch, STREAM_FLIP, index) < 0.5 if self.flip else np.zeros(index.shape, bool)
        return np.stack([dy, dx, flip], axis=1).astype(np.int32)


@dataclass(frozen=True)
class ResizedCropSpec:
    """Random-resized crop (area fraction `scale`, aspect `ratio`) plus flip, for decoded JPEGs.

    Boxes are drawn in coordinates relative to the source image so they do not depend on
    its pixel size, which the DALI backend only learns after decoding. For square sources
    the aspect ratio is exact; for others it is scaled by the source's own aspect ratio.
    """

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    attempts: int = 10
    kind: Literal["resized_crop"] = "resized_crop"

    @staticmethod
    def identity(n: int) -> np.ndarray:
        """The parameters recorded for `n` unaugmented (evaluation) samples, shaped like `params`."""
        return np.zeros((n, 5), dtype=np.float32)

    def params(self, seed: int, epoch: int, index: np.ndarray) -> np.ndarray:
        """float32 array B×5: (y0, x0, h, w, flip), box coordinates as fractions of the image."""
        index = np.asarray(index, dtype=np.int64)
        h = np.full(index.shape, np.nan)
        w = np.full(index.shape, np.nan)
        log_lo, log_hi = np.log(self.ratio[0]), np.log(self.ratio[1])
        for attempt in range(self.attempts):
            # Attempts use distinct epochs of the same stream: still a pure function of the inputs.
            sub = epoch * 64 + attempt
            area = self.scale[0] + (self.scale[1] - self.scale[0]) * uniform(seed, sub, STREAM_SCALE, index)
            ratio = np.exp(log_lo + (log_hi - log_lo) * uniform(seed, sub, STREAM_RATIO, index))
            cand_w, cand_h = np.sqrt(area * ratio), np.sqrt(area / ratio)
            fits = (cand_w <= 1.0) & (cand_h <= 1.0) & np.isnan(h)
            h[fits], w[fits] = cand_h[fits], cand_w[fits]
        fallback = np.isnan(h)
        h[fallback], w[fallback] = 1.0, 1.0
        y0 = (1.0 - h) * uniform(seed, epoch, STREAM_CROP_Y, index)
        x0 = (1.0 - w) * uniform(seed, epoch, STREAM_CROP_X, index)
        flip = uniform(seed, epoch, STREAM_FLIP, index) < 0.5 if self.flip else np.zeros(index.shape, bool)
        return np.stack([y0, x0, h, w, flip.astype(np.float64)], axis=1).astype(np.float32)


AugSpec = CropFlipSpec | ResizedCropSpec
