"""What a format reader returns, and the registry that maps format names to readers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Union

import numpy as np

from pipelines.errors import DataError
from pipelines.registry import Registry


def _init_class_names(split: "ArraySplit | FileSplit") -> None:
    """Default the readable names to the class ids, and refuse a names list of another length."""
    if split.class_names is None:
        object.__setattr__(split, "class_names", list(split.classes))
    elif len(split.class_names) != len(split.classes):
        raise ValueError(f"{len(split.class_names)} class names for {len(split.classes)} classes")


@dataclass(frozen=True)
class ArraySplit:
    """A split that fits in memory: uint8 images N×H×W×C (C-contiguous) and int64 labels.

    `classes` are the class ids as the data lists them (label i is `classes[i]`) and
    `class_names` their readable names (the ids themselves when the data has no others).
    Label -1 marks an unlabelled sample (STL-10's `unlabeled` split).
    """

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    class_names: list[str] | None = None

    def __post_init__(self) -> None:
        _init_class_names(self)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class FileSplit:
    """A split of encoded image files (JPEG/PNG), decoded by the pipeline; classes as in `ArraySplit`."""

    paths: list[Path]
    labels: np.ndarray
    classes: list[str]
    class_names: list[str] | None = None

    def __post_init__(self) -> None:
        _init_class_names(self)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


Split = Union[ArraySplit, FileSplit]


def head(split: Split, n: int) -> Split:
    """The first `n` samples of a split (all of it when `n` <= 0), for smoke runs and quick benchmarks."""
    if n <= 0 or n >= len(split.labels):
        return split
    if isinstance(split, ArraySplit):
        return ArraySplit(np.ascontiguousarray(split.images[:n]), split.labels[:n], split.classes, split.class_names)
    return FileSplit(split.paths[:n], split.labels[:n], split.classes, split.class_names)


def check_labels(labels: np.ndarray, num_classes: int, path: str | Path, what: str = "labels") -> None:
    """One-line DataError naming `path` unless every label is a class index in [0, num_classes)."""
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = int(labels.min()) if int(labels.min()) < 0 else int(labels.max())
        raise DataError(f"{path}: {what} include {bad}, outside [0, {num_classes - 1}] for the {num_classes} classes "
                        "the dataset lists")


@dataclass(frozen=True)
class DatasetFormat:
    """Static facts about a dataset layout plus its reader.

    `image_size` is the training crop size the recipe uses (e.g. 32 for CIFAR, 64 for
    Tiny-ImageNet, 224 for ImageNet). `eval_split` is the split used for validation.
    `num_classes` is the class count of the published dataset, for tools that read no
    data; a run takes its count and names from the data it reads (`Split.num_classes`,
    `Split.class_names`), since a folder may hold a subset (10 of Tiny-ImageNet's 200).
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
    data = fmt.read(root, split)
    if not data.classes:
        raise DataError(f"{root}: {format_name} split {split!r} lists no classes")
    check_labels(data.labels[data.labels != -1], data.num_classes, root, f"labels of split {split!r}")
    return data
