"""Fashion-MNIST IDX reader (gzipped or raw files, as distributed and as Debian ships them)."""

from __future__ import annotations

import contextlib
import gzip
import http.client
import os
import shutil
import struct
import urllib.request
import zlib
from pathlib import Path

import numpy as np

from pipelines.errors import DataError
from pipelines.formats.base import ArraySplit, DatasetFormat, check_labels, register_format

__all__ = ["DEBIAN_FASHION_MNIST", "FASHION_MNIST_CLASSES", "FASHION_MNIST_FILES", "FASHION_MNIST_URL",
           "download_fashion_mnist", "read_fashion_mnist", "read_idx_images", "read_idx_labels"]

# Where Debian's `dataset-fashion-mnist` package installs the real data.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# The publishers' download location and the four files it serves.
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                       "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]

_IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dimensions
_LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dimension
_SIZE = 28

_SPLIT_PREFIX = {"train": "train", "test": "t10k"}


def _find(root: Path, stem: str) -> Path:
    """The `.gz` or raw file for `stem`; a missing one names both spellings."""
    for cand in (root / f"{stem}.gz", root / stem):
        if cand.is_file():
            return cand
    raise DataError(f"{root / stem}[.gz]: file not found (Fashion-MNIST IDX file)")


def _read_bytes(path: Path) -> bytes:
    """Whole file contents, decompressing `.gz`; a corrupt or cut-off gzip is a DataError."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {' '.join(str(e).split())}); file truncated or corrupt?") from None


def _header(buf: bytes, path: Path, n_ints: int, magic: int) -> tuple[int, ...]:
    if len(buf) < 4 * n_ints:
        raise DataError(f"{path}: truncated IDX header ({len(buf)} bytes)")
    vals = struct.unpack(f">{n_ints}I", buf[: 4 * n_ints])
    if vals[0] != magic:
        raise DataError(f"{path}: bad IDX magic {vals[0]} (0x{vals[0]:08x}), expected {magic}")
    return vals[1:]


def read_idx_images(path: Path) -> np.ndarray:
    """N×28×28×1 uint8 images from an IDX3 file, checking magic and size against the header."""
    buf = _read_bytes(path)
    n, rows, cols = _header(buf, path, 4, _IMAGES_MAGIC)
    if (rows, cols) != (_SIZE, _SIZE):
        raise DataError(f"{path}: images are {rows}×{cols}, expected {_SIZE}×{_SIZE}")
    expected = 16 + n * rows * cols
    if len(buf) != expected:
        what = "truncated" if len(buf) < expected else "has trailing bytes"
        raise DataError(f"{path}: {what}: {len(buf)} bytes but header says {n} images of {rows}×{cols} ({expected} bytes)")
    return np.frombuffer(buf, dtype=np.uint8, offset=16).reshape(n, rows, cols, 1).copy()


def read_idx_labels(path: Path, num_classes: int = 10) -> np.ndarray:
    """int64 labels from an IDX1 file, checking magic, size and range."""
    buf = _read_bytes(path)
    (n,) = _header(buf, path, 2, _LABELS_MAGIC)
    if len(buf) != 8 + n:
        what = "truncated" if len(buf) < 8 + n else "has trailing bytes"
        raise DataError(f"{path}: {what}: {len(buf)} bytes but header says {n} labels ({8 + n} bytes)")
    labels = np.frombuffer(buf, dtype=np.uint8, offset=8).astype(np.int64)
    check_labels(labels, num_classes, path)
    return labels


def read_fashion_mnist(root: Path, split: str) -> ArraySplit:
    """Read the `train` (train-*) or `test` (t10k-*) split from a folder of IDX files.

    The IDX files carry no class names; Fashion-MNIST's ten are fixed by its publishers.
    """
    if split not in _SPLIT_PREFIX:
        raise DataError(f"data.split: fashion_mnist has no split {split!r} (splits: train, test)")
    root = Path(root)
    prefix = _SPLIT_PREFIX[split]
    img_path = _find(root, f"{prefix}-images-idx3-ubyte")
    lab_path = _find(root, f"{prefix}-labels-idx1-ubyte")
    images = read_idx_images(img_path)
    labels = read_idx_labels(lab_path, len(FASHION_MNIST_CLASSES))
    if len(images) != len(labels):
        raise DataError(f"{img_path}: {len(images)} images but {lab_path.name} has {len(labels)} labels")
    return ArraySplit(images=images, labels=labels, classes=list(FASHION_MNIST_CLASSES))


def _missing_dirs(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist yet, deepest first."""
    missing = []
    for d in (folder, *folder.parents):
        if d.exists():
            break
        missing.append(d)
    return missing


def download_fashion_mnist(dest: str | Path, base_url: str = FASHION_MNIST_URL, timeout: float = 60.0) -> Path:
    """Download the four gzipped IDX files into `dest` and return it.

    Each file is written under a temporary name and checked to be gzip before it takes its
    own. If any file fails, everything this call created goes again, the folders included
    (`dest` and any parents it had to make), so a failed attempt leaves no empty or partial
    dataset folder that a later run would mistake for data.
    """
    dest = Path(dest)
    created_dirs = _missing_dirs(dest)
    created_files: list[Path] = []
    url = base_url
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for name in FASHION_MNIST_FILES:
            url, target, part = base_url + name, dest / name, dest / f".{name}.part"
            if target.is_file():
                continue
            created_files.append(part)
            with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as f:
                shutil.copyfileobj(response, f)
            with gzip.open(part, "rb") as f:
                f.read(16)
            os.replace(part, target)
            created_files[-1] = target
    except BaseException as exc:
        for path in created_files:
            with contextlib.suppress(OSError):
                path.unlink()
        for d in created_dirs:  # deepest first; a folder someone else filled meanwhile stays
            with contextlib.suppress(OSError):
                d.rmdir()
        if isinstance(exc, (OSError, EOFError, zlib.error, http.client.HTTPException, ValueError)):
            raise DataError(f"{url}: download failed ({type(exc).__name__}: {' '.join(str(exc).split())}); "
                            f"the partial download in {dest} was removed (Debian's dataset-fashion-mnist package "
                            f"installs the files in {DEBIAN_FASHION_MNIST})") from None
        raise
    return dest


register_format(DatasetFormat(
    name="fashion_mnist", kind="array", num_classes=10, channels=1, image_size=28,
    mean=(0.2860,), std=(0.3530,),
    train_split="train", eval_split="test", read=read_fashion_mnist,
))
