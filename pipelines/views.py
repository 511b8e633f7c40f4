"""Geometry and bad-file policy shared by both backends for datasets of encoded images.

Training view: the relative box from `ResizedCropSpec.params` is mapped onto the decoded
image as a continuous (sub-pixel) region and resized to the crop size, so DALI
(`fn.resize` with a relative ROI) and Pillow (`Image.resize(box=...)`) sample exactly the
same region; only their filters and rounding differ.

Evaluation view: resize the shorter side to `resize`, then take the central `size` square.
DALI does it in two steps (`resize_shorter`, then a centre crop); `CenterCropSpec.box`
gives the same source region with DALI's rounding so Pillow can do it in one resize.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from pipelines.errors import DataError
from pipelines.formats.base import DatasetFormat

log = logging.getLogger("pipelines")

CorruptPolicy = Literal["error", "skip"]
CORRUPT_POLICIES: tuple[str, ...] = ("error", "skip")

# Shorter-side resize before the evaluation centre crop, per dataset format. Formats not
# listed evaluate at their native training size (Tiny-ImageNet: 64 -> 64).
_EVAL_RESIZE: dict[str, int] = {"imagenet": 256}


@dataclass(frozen=True)
class CenterCropSpec:
    """Evaluation view: shorter side resized to `resize`, central `size`×`size` crop."""

    resize: int
    size: int

    def __post_init__(self) -> None:
        if self.size > self.resize:
            raise ValueError(f"centre crop {self.size} is larger than the resized shorter side {self.resize}")

    def box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """Source region (x0, y0, x1, y1) in pixels that DALI's resize-then-crop samples."""
        scale = self.resize / min(width, height)
        out_w, out_h = math.floor(width * scale + 0.5), math.floor(height * scale + 0.5)
        ox = math.floor((out_w - self.size) / 2 + 0.5)
        oy = math.floor((out_h - self.size) / 2 + 0.5)
        return ox / scale, oy / scale, (ox + self.size) / scale, (oy + self.size) / scale


def eval_view(fmt: DatasetFormat) -> CenterCropSpec:
    return CenterCropSpec(resize=_EVAL_RESIZE.get(fmt.name, fmt.image_size), size=fmt.image_size)


def train_box(aug_row: np.ndarray, width: int, height: int) -> tuple[float, float, float, float]:
    """Pixel box (x0, y0, x1, y1) of one `ResizedCropSpec` row (y0, x0, h, w, flip), all relative."""
    y0, x0, h, w = (float(v) for v in aug_row[:4])
    return x0 * width, y0 * height, (x0 + w) * width, (y0 + h) * height


def looks_like_image(data: bytes | np.ndarray) -> bool:
    """Cheap signature check (JPEG, PNG) before a file reaches a decoder."""
    head = bytes(data[:8])
    return head[:3] == b"\xff\xd8\xff" or head == b"\x89PNG\r\n\x1a\n"


def check_policy(policy: str) -> CorruptPolicy:
    if policy not in CORRUPT_POLICIES:
        raise DataError(f"on_corrupt: {policy!r} is not one of {', '.join(CORRUPT_POLICIES)}")
    return policy  # type: ignore[return-value]


class CorruptFiles:
    """What to do with an image that does not decode: stop with a DataError, or skip it.

    Skipped files are warned about once each and counted; their sample indices are
    remembered so later epochs drop them before decoding.
    """

    def __init__(self, policy: str = "error") -> None:
        self.policy = check_policy(policy)
        self.skipped: dict[int, str] = {}
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        return len(self.skipped)

    def is_skipped(self, index: int) -> bool:
        return index in self.skipped

    def handle(self, index: int, path: Path, reason: str) -> None:
        """Raise (policy `error`) or record and warn (policy `skip`)."""
        reason = " ".join(reason.split())[:200]
        if self.policy == "error":
            raise DataError(f"{path}: corrupt or unreadable image ({reason}); set on_corrupt='skip' "
                            "(data.on_corrupt=skip in a run config) to skip such files")
        with self._lock:
            if index in self.skipped:
                return
            self.skipped[index] = str(path)
            total = len(self.skipped)
        log.warning("%s: corrupt image skipped (%s); %d skipped so far", path, reason, total)
