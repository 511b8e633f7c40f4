"""STL-10 binary reader.

Each image on disk is 3 channel planes of 96×96 stored column-major, so a plain reshape
gives transposed images; the reader converts to row-major N×96×96×3 once, in chunks, from
a memory map so the raw file is never held in memory twice.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipelines.errors import DataError
from pipelines.formats.base import ArraySplit, DatasetFormat, register_format

__all__ = ["STL10_CLASSES", "read_stl10", "read_stl10_images"]

STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]

_SIDE = 96
_IMAGE_BYTES = 3 * _SIDE * _SIDE
_CHUNK = 1024


def _folder(root: Path) -> Path:
    """Accept the parent folder or the `stl10_binary` folder itself."""
    if (root / "stl10_binary").is_dir():
        return root / "stl10_binary"
    if any((root / f).exists() for f in ("train_X.bin", "test_X.bin", "unlabeled_X.bin")):
        return root
    raise DataError(f"{root / 'stl10_binary'}: folder not found (expected data.root to contain stl10_binary/ with *_X.bin files)")


def read_stl10_images(path: Path) -> np.ndarray:
    """N×96×96×3 uint8 C-contiguous images from an STL `*_X.bin` file."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    size = path.stat().st_size
    if size % _IMAGE_BYTES:
        raise DataError(f"{path}: truncated: {size} bytes is not a multiple of {_IMAGE_BYTES} (3×96×96)")
    n = size // _IMAGE_BYTES
    out = np.empty((n, _SIDE, _SIDE, 3), dtype=np.uint8)
    if n == 0:
        return out
    raw = np.memmap(path, dtype=np.uint8, mode="r", shape=(n, 3, _SIDE, _SIDE))
    # raw[i, c, x, y]: channel c stored column-major, so the third axis is the column.
    for start in range(0, n, _CHUNK):
        out[start:start + _CHUNK] = raw[start:start + _CHUNK].transpose(0, 3, 2, 1)
    del raw
    return out


def _read_labels(path: Path, n_images: int, x_path: Path, num_classes: int) -> np.ndarray:
    """0-based labels from a `*_y.bin` file, which stores 1..num_classes."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    labels = np.fromfile(path, dtype=np.uint8).astype(np.int64)
    if len(labels) != n_images:
        raise DataError(f"{path}: {len(labels)} labels but {x_path.name} has {n_images} images")
    if len(labels) and (labels.min() < 1 or labels.max() > num_classes):
        raise DataError(f"{path}: labels in [{labels.min()}, {labels.max()}], expected 1..{num_classes} "
                        f"(the classes {x_path.parent / 'class_names.txt'} lists)")
    return labels - 1


def _classes(d: Path) -> list[str]:
    """The names `class_names.txt` lists (STL-10's ten when the file is absent)."""
    path = d / "class_names.txt"
    if not path.is_file():
        return list(STL10_CLASSES)
    names = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    if not names:
        raise DataError(f"{path}: lists no class names")
    return names


def read_stl10(root: Path, split: str) -> ArraySplit:
    """Read `train`, `test` or `unlabeled` (labels all -1) from `stl10_binary/`."""
    if split not in ("train", "test", "unlabeled"):
        raise DataError(f"data.split: stl10 has no split {split!r} (splits: train, test, unlabeled)")
    d = _folder(Path(root))
    classes = _classes(d)
    x_path = d / f"{split}_X.bin"
    images = read_stl10_images(x_path)
    if split == "unlabeled":
        labels = np.full(len(images), -1, dtype=np.int64)
    else:
        labels = _read_labels(d / f"{split}_y.bin", len(images), x_path, len(classes))
    return ArraySplit(images=images, labels=labels, classes=classes)


register_format(DatasetFormat(
    name="stl10", kind="array", num_classes=10, channels=3, image_size=96,
    mean=(0.4467, 0.4398, 0.4066), std=(0.2603, 0.2566, 0.2713),
    train_split="train", eval_split="test", read=read_stl10,
))
