"""Pipeline backends behind one constructor, chosen by `data.pipeline` (`torch`, `dali` or `auto`).

`auto` reads `auto_backend.json` beside this file: for each dataset kind (`array`, `files`)
and device type (`cpu`, `cuda`) it holds the backend that `python -m rrd_fast.bench
pipelines --write-auto-table` measured to be faster on such a machine, with the figures. Where the
table has no measurement for the pair, or names DALI but DALI is not installed, `auto`
falls back to `torch`, the backend that is always installed. The choice and its reason are
logged on the `pipelines.backends` logger.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch

from pipelines.augment import AugSpec, CropFlipSpec, ResizedCropSpec
from pipelines.batch import Batch
from pipelines.errors import DataError
from pipelines.formats.base import ArraySplit, DatasetFormat, Split
from pipelines.registry import Registry
from pipelines.sampler import EpochSampler
from pipelines.torch_arrays import ArrayPipeline

log = logging.getLogger("pipelines.backends")

AUTO_TABLE = Path(__file__).with_name("auto_backend.json")
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

def auto_key(kind: str, device: str | torch.device) -> str:
    """Table key of a dataset kind on a device type, e.g. `array/cpu`, `files/cuda`."""
    return f"{kind}/{torch.device(device).type}"


def load_auto_table(path: str | Path | None = None) -> dict[str, Any]:
    """The measured-choice table (an empty one if the file does not exist)."""
    path = Path(path) if path is not None else AUTO_TABLE
    if not path.is_file():
        return {"entries": {}}
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable backend table ({exc})") from None
    if not isinstance(table, dict) or not isinstance(table.get("entries"), dict):
        raise DataError(f"{path}: backend table has no 'entries' mapping")
    return table


def resolve_backend(requested: str, fmt: DatasetFormat, device: str | torch.device,
                    table: str | Path | None = None) -> str:
    """Map `auto` to the backend measured fastest for this dataset kind and device; others pass through."""
    if requested != "auto":
        return requested
    path = Path(table) if table is not None else AUTO_TABLE
    key = auto_key(fmt.kind, device)
    entry = load_auto_table(path).get("entries", {}).get(key)
    choice, reason = FALLBACK_BACKEND, f"no measurement for {key} in {path.name}; fallback"
    if isinstance(entry, dict) and entry.get("backend") in BACKENDS:
        figures = ", ".join(f"{k} {v:,.0f} img/s" for k, v in sorted(entry.get("img_s", {}).items()))
        reason = f"measured on {entry.get('machine', 'unknown machine')}: {figures}"
        choice = entry["backend"]
        if choice == "dali":
            from pipelines.dali_common import dali_available

            if not dali_available():
                choice, reason = FALLBACK_BACKEND, f"{reason}; DALI is not installed, fallback"
    log.info("data.pipeline=auto: %s for %s data of %s on %s (%s)", choice, fmt.kind, fmt.name,
             torch.device(device).type, reason)
    return choice
