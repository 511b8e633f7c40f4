"""The images an artifact is evaluated (and int8-calibrated) on.

By default the dataset named in the student's sidecar; `--data CFG` points at a training
config instead, read by the trainer's own `load_config` (which needs no training code), of
which `data.format`, `data.root` and `data.eval_limit` are used. Batches come from the
project's torch pipeline, normalised exactly as in training evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from export.base import CalibrationSource
from export.errors import ExportError
from pipelines.backends import build_pipeline
from pipelines.errors import DataError
from pipelines.formats import ArraySplit, DatasetFormat, FileSplit, Split, get_format, head, read_split
from pipelines.sampler import EpochSampler
from rrd_fast.config import load_config


@dataclass(frozen=True)
class DataSource:
    format: str
    root: str
    eval_limit: int = 0


def data_source(meta: dict[str, Any], config: str | Path | None = None, eval_limit: int | None = None) -> DataSource:
    """Where a student's evaluation data lives: `config`'s data section, else the checkpoint sidecar's."""
    if config is not None:
        path = Path(config)
        if not path.is_file():
            raise ExportError(f"{path}: --data config not found")
        data = load_config(path).data
        if data.eval_limit < 0:
            raise ExportError(f"{path}: data.eval_limit must be a non-negative integer, got {data.eval_limit!r}")
        source = DataSource(data.format, data.root, data.eval_limit)
    else:
        dataset = meta.get("dataset")
        if not isinstance(dataset, dict) or "format" not in dataset or "root" not in dataset:
            raise ExportError(
                f"checkpoint sidecar of {meta.get('arch', 'the student')} names no dataset (field 'dataset'); pass --data CFG"
            )
        source = DataSource(str(dataset["format"]), str(dataset["root"]), 0)
    if eval_limit is not None:
        if eval_limit < 0:
            raise ExportError(f"--eval-limit must be >= 0, got {eval_limit}")
        source = DataSource(source.format, source.root, eval_limit)
    return source


def _spread(split: Split, n: int) -> Split:
    """`n` samples spread evenly over the split (training splits are often sorted by class)."""
    total = len(split.labels)
    if n <= 0 or n >= total:
        return split
    index = np.linspace(0, total - 1, n).round().astype(np.int64)
    if isinstance(split, ArraySplit):
        return ArraySplit(np.ascontiguousarray(split.images[index]), split.labels[index], split.classes)
    return FileSplit([split.paths[i] for i in index], split.labels[index], split.classes)


class ImageSet:
    """One split of the student's dataset as normalised NCHW batches, checked against the student's input."""

    def __init__(self, source: DataSource, meta: dict[str, Any], which: str = "eval",
                 limit: int = 0, spread: bool = False, device: str = "cpu") -> None:
        self.fmt: DatasetFormat = get_format(source.format)
        split_name = self.fmt.eval_split if which == "eval" else self.fmt.train_split
        split = read_split(source.format, source.root, split_name)
        split = _spread(split, limit) if spread else head(split, limit)
        if len(split.labels) == 0:
            raise DataError(f"{source.root}: split {split_name!r} of {source.format} is empty")
        self.source, self.split_name, self.split, self.device = source, split_name, split, device
        want_c, want_s = int(meta["in_channels"]), int(meta["image_size"])
        self.chw = (want_c, want_s, want_s)
        if isinstance(split, ArraySplit):
            _, h, w, c = split.images.shape
            if (c, h, w) != (want_c, want_s, want_s):
                raise DataError(
                    f"{source.root}: {source.format} images are {h}×{w}×{c}, but the student expects "
                    f"{want_s}×{want_s}×{want_c} (data.format does not match the checkpoint)"
                )
        if split.num_classes != int(meta["num_classes"]):
            raise DataError(
                f"{source.root}: {source.format} has {split.num_classes} classes, the student {meta['num_classes']}"
            )
        self.labels = torch.from_numpy(np.asarray(split.labels, dtype=np.int64))

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Normalised float32 image batches in dataset order (the last one may be short)."""
        sampler = EpochSampler(len(self), batch_size, shuffle=False, drop_last=False)
        pipeline = build_pipeline("torch", self.split, self.fmt, sampler, None, device=self.device)
        try:
            for batch in pipeline.epoch(0):
                if tuple(batch.images.shape[1:]) != self.chw:
                    raise DataError(
                        f"{self.source.root}: {self.source.format} gives {tuple(batch.images.shape[1:])} images, "
                        f"the student expects {self.chw} (data.format does not match the checkpoint)"
                    )
                yield batch.images
        finally:
            close = getattr(pipeline, "close", None)
            if close is not None:
                close()

    def first_batch(self, batch_size: int) -> torch.Tensor:
        """`batch_size` real images for timing, repeating the split when it is smaller."""
        images = next(self.batches(min(batch_size, len(self))))
        while images.shape[0] < batch_size:
            images = torch.cat([images, images])
        return images[:batch_size].contiguous()


def calibration_source(source: DataSource, meta: dict[str, Any], samples: int,
                       batch_size: int = 64) -> tuple[CalibrationSource, dict[str, Any]]:
    """A re-iterable source of `samples` training images (spread over the split) for int8 calibration, and its record."""
    train = ImageSet(source, meta, which="train", limit=samples, spread=True)
    info = {"split": train.split_name, "samples": len(train), "format": source.format, "root": source.root,
            "method": "min/max"}
    return (lambda: train.batches(batch_size)), info
