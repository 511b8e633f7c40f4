"""Pipeline backends behind one constructor, chosen by `data.pipeline`."""

from __future__ import annotations

from typing import Callable, Iterator, Protocol

import numpy as np
import torch

from pipelines.augment import AugSpec, CropFlipSpec
from pipelines.batch import Batch
from pipelines.errors import DataError
from pipelines.formats.base import ArraySplit, DatasetFormat, Split
from pipelines.sampler import EpochSampler
from pipelines.torch_pipeline import ArrayPipeline


class Pipeline(Protocol):
    sampler: EpochSampler

    def __len__(self) -> int: ...

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]: ...

    def batch_for(self, index: np.ndarray, epoch: int) -> Batch: ...


PipelineFactory = Callable[..., Pipeline]
_BACKENDS: dict[str, PipelineFactory] = {}


def register_backend(name: str) -> Callable[[PipelineFactory], PipelineFactory]:
    """Register `factory(split, fmt, sampler, augment, device, dtype) -> Pipeline`."""

    def wrap(factory: PipelineFactory) -> PipelineFactory:
        _BACKENDS[name] = factory
        return factory

    return wrap


def build_pipeline(
    backend: str,
    split: Split,
    fmt: DatasetFormat,
    sampler: EpochSampler,
    augment: AugSpec | None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Pipeline:
    if backend not in _BACKENDS:
        raise DataError(f"data.pipeline: unknown backend {backend!r} (known: {', '.join(sorted(_BACKENDS))})")
    return _BACKENDS[backend](split=split, fmt=fmt, sampler=sampler, augment=augment, device=device, dtype=dtype)


@register_backend("torch")
def _torch_backend(split: Split, fmt: DatasetFormat, sampler: EpochSampler, augment: AugSpec | None,
                   device: str | torch.device, dtype: torch.dtype) -> Pipeline:
    if isinstance(split, ArraySplit):
        if augment is not None and not isinstance(augment, CropFlipSpec):
            raise DataError(f"data: format {fmt.name!r} holds arrays; expected crop-and-flip augmentation")
        return ArrayPipeline(split.images, split.labels, sampler, fmt.mean, fmt.std, augment, device=device, dtype=dtype)
    raise DataError(f"data.pipeline: the torch backend has no reader for file datasets like {fmt.name!r} yet")


def resolve_backend(requested: str, fmt: DatasetFormat, device: str | torch.device) -> str:
    """Map `auto` to a concrete backend; explicit choices pass through unchanged."""
    if requested != "auto":
        return requested
    return "torch"
