"""Pipeline backends behind one constructor, chosen by `data.pipeline` (`torch`, `dali` or `auto`).

`auto` picks the backend measured fastest on this machine (CPU model, usable cores, vector
extensions, GPU) for the dataset kind (`array`, `files`) and device type: from the table
shipped beside this file (`auto_backend.json`, written by `python -m rrd_fast.bench
pipelines --write-auto-table`), else from the user's cache, else by probing a few batches
of the run's own data once and caching the winner (pipelines/auto.py). Where DALI is not
installed, or nothing can be measured, `auto` falls back to `torch`, the backend that is
always installed. The choice and its reason are logged on the `pipelines.backends` logger.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch

from pipelines.augment import AugSpec, CropFlipSpec, ResizedCropSpec
from pipelines.auto import PROBE_BATCHES, REFERENCE_BATCH, SHIPPED_TABLE, choose, entry_key, load_table
from pipelines.batch import Batch
from pipelines.errors import DataError
from pipelines.formats.base import ArraySplit, DatasetFormat, Split, head
from pipelines.registry import Registry
from pipelines.sampler import EpochSampler
from pipelines.torch_arrays import ArrayPipeline

log = logging.getLogger("pipelines.backends")

AUTO_TABLE = SHIPPED_TABLE
FALLBACK_BACKEND = "torch"


class Pipeline(Protocol):
    sampler: EpochSampler
    dtype: torch.dtype  # of the images it yields

    def __len__(self) -> int: ...

    def epoch(self, epoch: int, start_step: int = 0, aug_epoch: int | None = None) -> Iterator[Batch]: ...

    def batch_for(self, index: np.ndarray, epoch: int) -> Batch: ...


PipelineFactory = Callable[..., Pipeline]
BACKENDS: Registry[PipelineFactory] = Registry("backend", setting="data.pipeline", error=DataError)


def register_backend(name: str) -> Callable[[PipelineFactory], PipelineFactory]:
    """Register `factory(split, fmt, sampler, augment, device, dtype, on_corrupt) -> Pipeline`."""
    return BACKENDS.register(name=name)


def list_backends() -> list[str]:
    return BACKENDS.names()


def build_pipeline(
    backend: str,
    split: Split,
    fmt: DatasetFormat,
    sampler: EpochSampler,
    augment: AugSpec | None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    on_corrupt: str = "error",
) -> Pipeline:
    """`on_corrupt` (file datasets): `error` stops at an undecodable image, `skip` drops it with a warning."""
    factory = BACKENDS.get(backend)
    _check_augment(split, fmt, augment)
    return factory(split=split, fmt=fmt, sampler=sampler, augment=augment, device=device, dtype=dtype,
                   on_corrupt=on_corrupt)


def _check_augment(split: Split, fmt: DatasetFormat, augment: AugSpec | None) -> None:
    if augment is None:
        return
    if isinstance(split, ArraySplit) and not isinstance(augment, CropFlipSpec):
        raise DataError(f"data: format {fmt.name!r} holds arrays; expected crop-and-flip augmentation")
    if not isinstance(split, ArraySplit) and not isinstance(augment, ResizedCropSpec):
        raise DataError(f"data: format {fmt.name!r} holds image files; expected random-resized-crop augmentation")


@register_backend("torch")
def _torch_backend(split: Split, fmt: DatasetFormat, sampler: EpochSampler, augment: AugSpec | None,
                   device: str | torch.device, dtype: torch.dtype, on_corrupt: str = "error") -> Pipeline:
    if isinstance(split, ArraySplit):
        return ArrayPipeline(split.images, split.labels, sampler, fmt.mean, fmt.std, augment, device=device, dtype=dtype)
    from pipelines.torch_files import FilePipeline
    from pipelines.views import eval_view

    return FilePipeline(split.paths, split.labels, sampler, fmt.mean, fmt.std, augment, fmt.image_size, eval_view(fmt),
                        device=device, dtype=dtype, on_corrupt=on_corrupt)


@register_backend("dali")
def _dali_backend(split: Split, fmt: DatasetFormat, sampler: EpochSampler, augment: AugSpec | None,
                  device: str | torch.device, dtype: torch.dtype, on_corrupt: str = "error") -> Pipeline:
    # Imported here so that torch-only installs never import DALI.
    if isinstance(split, ArraySplit):
        from pipelines.dali_arrays import DaliArrayPipeline

        return DaliArrayPipeline(split.images, split.labels, sampler, fmt.mean, fmt.std, augment, device=device, dtype=dtype)
    from pipelines.dali_files import DaliFilePipeline
    from pipelines.views import eval_view

    return DaliFilePipeline(split.paths, split.labels, sampler, fmt.mean, fmt.std, augment, fmt.image_size,
                            eval_view(fmt), device=device, dtype=dtype, on_corrupt=on_corrupt)


# ---------------------------------------------------------------------------------------
# auto
# ---------------------------------------------------------------------------------------

auto_key = entry_key


def load_auto_table(path: str | Path | None = None) -> dict[str, Any]:
    """A machine-keyed measured-choice table (the shipped one by default; empty if the file does not exist)."""
    return load_table(AUTO_TABLE if path is None else path)


def _installed() -> list[str]:
    from pipelines.dali_common import dali_available

    return [name for name in list_backends() if name != "dali" or dali_available()]


def resolve_backend(requested: str, fmt: DatasetFormat, device: str | torch.device,
                    table: str | Path | None = None, split: Split | None = None, augment: AugSpec | None = None,
                    batch_size: int = 256, dtype: torch.dtype = torch.float32) -> str:
    """Map `auto` to the backend measured fastest on this machine for this data kind; others pass through.

    `table` replaces the shipped table (tests). With `split` (the run's training split, its
    `augment` spec, per-rank `batch_size` and batch `dtype`), a machine without a
    measurement is probed once on a few batches of that data, at the reference batch of
    the shipped table where the split is large enough (pipelines/auto.py).
    """
    if requested != "auto":
        return requested
    make, probe_batch = None, batch_size
    if split is not None and len(split.labels) >= min(batch_size, REFERENCE_BATCH):
        probe_batch = REFERENCE_BATCH if len(split.labels) >= REFERENCE_BATCH else batch_size
        n = min(len(split.labels), probe_batch * PROBE_BATCHES * 2)
        sample = head(split, n)
        sampler = EpochSampler(n, probe_batch, seed=0)

        def make(name: str) -> Pipeline:
            return build_pipeline(name, sample, fmt, sampler, augment, device=device, dtype=dtype)

    what = f"{fmt.name} ({len(split.labels) if split is not None else 0} samples, batch {probe_batch})"
    choice, reason = choose(fmt.kind, device, _installed(), FALLBACK_BACKEND, AUTO_TABLE if table is None else table,
                            make, what, store=probe_batch == REFERENCE_BATCH)
    log.info("data.pipeline=auto: %s for %s data of %s on %s (%s)", choice, fmt.kind, fmt.name,
             torch.device(device).type, reason)
    return choice
