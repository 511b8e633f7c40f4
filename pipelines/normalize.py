"""Normalisation shared by the torch pipelines: uint8 pixels to (x / 255 - mean) / std.

The arithmetic is always fp32 and a half-precision output is rounded once at the end, as
the DALI pipelines do (they normalise in fp32 inside the fused operator). Normalising in
bf16 itself would round the scale constants to 8 bits and every intermediate too, so a
mixed-precision run would see slightly different inputs than an fp32 run under autocast.
"""

from __future__ import annotations

from typing import Sequence

import torch


class Normalizer:
    """Maps a uint8 N×C×H×W tensor (any strides) to a contiguous normalised tensor of `dtype`."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device, dtype: torch.dtype) -> None:
        c = len(mean)
        self.dtype = dtype
        self.scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=device).view(1, c, 1, 1)
        self.shift = torch.tensor([m / s for m, s in zip(mean, std)], device=device).view(1, c, 1, 1)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        out = pixels.to(torch.float32, memory_format=torch.contiguous_format).mul_(self.scale).sub_(self.shift)
        return out if self.dtype == torch.float32 else out.to(self.dtype)
