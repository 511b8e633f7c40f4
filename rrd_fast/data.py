"""Builds the train and eval pipelines of a run from its data config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipelines.augment import AugSpec, CropFlipSpec, ResizedCropSpec
from pipelines.backends import Pipeline, build_pipeline, resolve_backend
from pipelines.formats import DatasetFormat, get_format, head, read_split
from pipelines.sampler import EpochSampler
from rrd_fast.config import ConfigError, DataConfig


@dataclass
class RunData:
    """A run's pipelines and what the data says about itself.

    `num_classes` and `class_names` come from the dataset as read (CIFAR's meta file,
    Tiny-ImageNet's wnids.txt and words.txt, STL-10's class_names.txt, ImageNet's folders,
    Fashion-MNIST's fixed ten), not from the format: a folder may hold a subset of classes.
    """

    fmt: DatasetFormat
    train: Pipeline
    eval: Pipeline
    num_train: int
    num_eval: int
    backend: str
    train_labels: np.ndarray | None = None  # labels of the (limited) training split, for class-aware memories
    train_split: Any = None  # the (limited) training split as read: arrays or file list, for fingerprints
    num_classes: int = 0
    class_names: list[str] = field(default_factory=list)


def train_augmentation(cfg: DataConfig, fmt: DatasetFormat) -> AugSpec:
    if fmt.kind == "array":
        return CropFlipSpec(pad=cfg.pad, flip=cfg.flip)
    return ResizedCropSpec(flip=cfg.flip)


# The batches' dtype under each train.mixed_precision: autocast would round fp32 inputs to
# this type at the first convolution anyway, so handing them over already rounded changes
# no result and halves the bytes every pipeline writes and moves.
IMAGE_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_data(cfg: DataConfig, seed: int, rank: int, world_size: int, device: torch.device,
               precision: str = "no") -> RunData:
    """Train and eval pipelines for one rank; `precision` (train.mixed_precision) sets the batches' dtype."""
    fmt = get_format(cfg.format)
    dtype = IMAGE_DTYPES[precision]
    if cfg.batch_size % world_size:
        raise ConfigError(f"data.batch_size: global batch {cfg.batch_size} does not divide across {world_size} processes")
    train_split = head(read_split(fmt.name, cfg.root, fmt.train_split), cfg.train_limit)
    eval_split = head(read_split(fmt.name, cfg.root, fmt.eval_split), cfg.eval_limit)
    per_rank = cfg.batch_size // world_size
    n_train, n_eval = len(train_split.labels), len(eval_split.labels)
    if n_train < cfg.batch_size:
        raise ConfigError(f"data.batch_size: {cfg.batch_size} is larger than the {n_train} training samples")
    train_sampler = EpochSampler(n_train, per_rank, seed=seed, rank=rank, world_size=world_size, shuffle=True, drop_last=True)
    eval_sampler = EpochSampler(n_eval, max(1, cfg.eval_batch_size // world_size), seed=seed, rank=rank,
                                world_size=world_size, shuffle=False, drop_last=False)
    augment = train_augmentation(cfg, fmt)
    backend = resolve_backend(cfg.pipeline, fmt, device, split=train_split, augment=augment, batch_size=per_rank,
                              dtype=dtype)
    train = build_pipeline(backend, train_split, fmt, train_sampler, augment, device=device,
                           dtype=dtype, on_corrupt=cfg.on_corrupt)
    evaluation = build_pipeline(backend, eval_split, fmt, eval_sampler, None, device=device, dtype=dtype,
                                on_corrupt=cfg.on_corrupt)
    return RunData(fmt, train, evaluation, n_train, n_eval, backend, np.asarray(train_split.labels, dtype=np.int64),
                   train_split, num_classes=train_split.num_classes, class_names=list(train_split.class_names))
