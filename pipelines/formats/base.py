"""What a format reader returns, and the registry that maps format names to readers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Union

import numpy as np

from pipelines.errors import DataError
from pipelines.registry import Registry


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


FORMATS: Registry[DatasetFormat] = Registry("dataset format", setting="data.format", error=DataError)


def register_format(fmt: DatasetFormat) -> DatasetFormat:
    return FORMATS.register(fmt)


def get_format(name: str) -> DatasetFormat:
    return FORMATS.get(name)


def list_formats() -> list[str]:
    return FORMATS.names()


def read_split(format_name: str, root: str | Path, split: str) -> Split:
    """Read one split; a missing root is reported before the reader runs."""
    fmt = get_format(format_name)
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: dataset folder not found (data.root for format {format_name!r})")
    return fmt.read(root, split)
