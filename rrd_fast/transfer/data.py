"""The probe's data: the target data set read by its own reader, resized once to 32x32 uint8 arrays.

Resizing: the reference applies torchvision's `Resize((32, 32))` to PIL images, which is
Pillow's `Image.resize` with the bilinear filter; Pillow widens that filter's support by the
reduction factor, so 96->32 (STL-10) and 64->32 (Tiny-ImageNet) are antialiased. Here every
image goes through exactly that call once (Tiny-ImageNet's JPEGs are decoded and converted
to RGB first, as torchvision's image loader does), before augmentation, so the pad-4
crop-and-flip afterwards is the array pipeline's ordinary one and each epoch costs no decoding.
The readers themselves are untouched: training still sees the native resolution.

Normalisation uses the reference's transfer constants (STL-10's third std is 0.2712 there,
0.2713 in the training format).
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipelines.augment import CropFlipSpec
from pipelines.backends import Pipeline, build_pipeline, resolve_backend
from pipelines.errors import DataError
from pipelines.formats import ArraySplit, DatasetFormat, Split, get_format, head, read_split
from pipelines.sampler import EpochSampler
from rrd_fast.transfer.config import ProbeConfig

# (mean, std) of the reference's transfer loaders.
TRANSFER_NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2712)),
    "tiny_imagenet": ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)),
}


@dataclass
class ProbeData:
    fmt: DatasetFormat  # the target's format at the probe's resolution and normalisation
    train: Pipeline
    eval: Pipeline
    train_split: ArraySplit
    eval_split: ArraySplit
    backend: str

    @property
    def num_classes(self) -> int:
        return len(self.train_split.classes)


def _workers(requested: int) -> int:
    if requested > 0:
        return requested
    try:
        return max(1, min(len(os.sched_getaffinity(0)), 16))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, min(os.cpu_count() or 1, 16))


def _resize(img: Image.Image, size: int) -> np.ndarray:
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img)


def resize_split(split: Split, size: int, workers: int = 0) -> ArraySplit:
    """The split as N×size×size×3 uint8 arrays, each image resized by Pillow's bilinear (antialiased) filter."""
    n = len(split.labels)
    out = np.empty((n, size, size, 3), dtype=np.uint8)

    if isinstance(split, ArraySplit):
        if split.images.shape[-1] != 3:
            raise DataError(f"the probe needs RGB images; this split has {split.images.shape[-1]} channel(s)")
        if split.images.shape[1:3] == (size, size):
            return ArraySplit(np.ascontiguousarray(split.images), split.labels, split.classes)

        def one(i: int) -> None:
            out[i] = _resize(Image.fromarray(split.images[i]), size)
    else:
        paths = split.paths

        def one(i: int) -> None:
            try:
                with Image.open(paths[i]) as im:
                    out[i] = _resize(im.convert("RGB"), size)
            except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
                raise DataError(f"{paths[i]}: corrupt or unreadable image ({' '.join(str(exc).split())[:200]})") from None

    with ThreadPoolExecutor(max_workers=_workers(workers)) as pool:
        for _ in pool.map(one, range(n)):
            pass
    return ArraySplit(out, np.asarray(split.labels, dtype=np.int64), split.classes)


def check_root(cfg: ProbeConfig) -> None:
    root = Path(cfg.root)
    if not root.exists():
        raise DataError(f"{root}: dataset folder not found (--root for {cfg.dataset})")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (--root for {cfg.dataset})")


def read_probe_splits(cfg: ProbeConfig) -> tuple[DatasetFormat, ArraySplit, ArraySplit]:
    """The target's training and test splits (the reference's: STL-10 train/test, Tiny-ImageNet train/val), resized."""
    check_root(cfg)
    fmt = get_format(cfg.dataset)
    train = head(read_split(fmt.name, cfg.root, fmt.train_split), cfg.train_limit)
    test = head(read_split(fmt.name, cfg.root, fmt.eval_split), cfg.eval_limit)
    mean, std = TRANSFER_NORMALIZATION[fmt.name]
    probe_fmt = dataclasses.replace(fmt, kind="array", image_size=cfg.image_size, mean=mean, std=std,
                                    num_classes=len(train.classes))
    return probe_fmt, resize_split(train, cfg.image_size, cfg.workers), resize_split(test, cfg.image_size, cfg.workers)


def build_probe_data(cfg: ProbeConfig, device: torch.device, splits: tuple[DatasetFormat, ArraySplit, ArraySplit]
                     | None = None) -> ProbeData:
    """Train pipeline (shuffled, last partial batch kept, pad-crop-flip) and test pipeline (in order, no augmentation)."""
    fmt, train, test = splits if splits is not None else read_probe_splits(cfg)
    n_train, n_test = len(train.labels), len(test.labels)
    if n_train == 0 or n_test == 0:
        raise DataError(f"{cfg.root}: {cfg.dataset} has {n_train} training and {n_test} test images; the probe needs both")
    train_sampler = EpochSampler(n_train, cfg.batch_size, seed=cfg.seed, shuffle=True, drop_last=False)
    test_sampler = EpochSampler(n_test, cfg.eval_batch_size, seed=cfg.seed, shuffle=False, drop_last=False)
    backend = resolve_backend(cfg.pipeline, fmt, device)
    augment = CropFlipSpec(pad=cfg.pad, flip=cfg.flip)
    train_pipe = build_pipeline(backend, train, fmt, train_sampler, augment, device=device)
    test_pipe = build_pipeline(backend, test, fmt, test_sampler, None, device=device)
    return ProbeData(fmt, train_pipe, test_pipe, train, test, backend)
