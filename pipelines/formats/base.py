"""What a format reader returns, and the registry that maps format names to readers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Protocol, Union

import numpy as np

from pipelines.errors import DataError, did_you_mean


@dataclass(frozen=True)
class ArraySplit:
    """A split that fits in memory: uint8 images N×H×W×C (C-contiguous) and int64 labels."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]


@dataclass(frozen=True)
class FileSplit:
    """A split of encoded image files (JPEG/PNG), decoded by the pipeline."""

    paths: list[Path]
    labels: np.ndarray
    classes: list[str]


Split = Union[ArraySplit, FileSplit]


def head(split: Split, n: int) -> Split:
    """The first `n` samples of a split (all of it when `n` <= 0), for smoke runs and quick benchmarks."""
    if n <= 0 or n >= len(split.labels):
        return split
    if isinstance(split, ArraySplit):
        return ArraySplit(np.ascontiguousarray(split.images[:n]), split.labels[:n], split.classes)
    return FileSplit(split.paths[:n], split.labels[:n], split.classes)


@dataclass(frozen=True)
class DatasetFormat:
    """Static facts about a dataset layout plus its reader.

    `image_size` is the training crop size the recipe uses (e.g. 32 for CIFAR, 64 for
    Tiny-ImageNet, 224 for ImageNet). `eval_split` is the split used for validation.
    """

    name: str
    kind: Literal["array", "files"]
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_split: str
    eval_split: str
    read: Callable[[Path, str], Split]


_FORMATS: dict[str, DatasetFormat] = {}


def register_format(fmt: DatasetFormat) -> DatasetFormat:
    if fmt.name in _FORMATS:
        raise ValueError(f"dataset format {fmt.name!r} registered twice")
    _FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> DatasetFormat:
    if name not in _FORMATS:
        hint = did_you_mean(name, _FORMATS)
        raise DataError(f"data.format: unknown dataset format {name!r}{hint} (known: {', '.join(sorted(_FORMATS))})")
    return _FORMATS[name]


def list_formats() -> list[str]:
    return sorted(_FORMATS)


def read_split(format_name: str, root: str | Path, split: str) -> Split:
    """Read one split; a missing root is reported before the reader runs."""
    fmt = get_format(format_name)
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: dataset folder not found (data.root for format {format_name!r})")
    return fmt.read(root, split)
