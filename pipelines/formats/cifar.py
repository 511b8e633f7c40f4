"""CIFAR-10 / CIFAR-100 "python version" readers with a restricted unpickler.

The official files are Python-2 pickles. Unpickling runs code named by the file, so a
downloaded or swapped file could execute anything. The unpickler here resolves only the
three numpy globals real CIFAR files use and refuses everything else before it is called.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipelines.errors import DataError
from pipelines.formats.base import ArraySplit, DatasetFormat, check_labels, register_format

__all__ = ["RestrictedUnpickler", "load_cifar_pickle", "read_cifar100", "read_cifar10"]


def _reconstruct() -> Callable[..., Any]:
    """numpy's array reconstructor, preferring the numpy 2 module path (no deprecation warning)."""
    try:
        from numpy._core.multiarray import _reconstruct as fn  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct as fn  # type: ignore[no-redef]
    return fn


_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
}


def _one_line(msg: object) -> str:
    return " ".join(str(msg).split())


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy's array-reconstruction globals.

    `find_class` is the only way a pickle can obtain a callable (GLOBAL, STACK_GLOBAL and
    the EXT opcodes all go through it), so refusing here stops a hostile file before any of
    its code runs. Persistent ids are refused too.
    """

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        resolve = _ALLOWED_GLOBALS.get((module, name))
        if resolve is None:
            shown = _one_line(f"{module}.{name}")[:200]
            raise DataError(
                f"{self._path}: refused to unpickle global {shown} "
                "(only numpy array reconstruction is allowed in CIFAR files)"
            )
        return resolve()

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"{self._path}: refused pickle persistent id (not used by CIFAR files)")


def load_cifar_pickle(path: Path) -> dict:
    """Load one CIFAR pickle with the restricted unpickler; any failure is a one-line DataError."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with open(path, "rb") as f:
            obj = RestrictedUnpickler(f, path).load()
    except DataError:
        raise
    except MemoryError:
        raise DataError(f"{path}: malformed pickle (claims more memory than available)") from None
    except Exception as e:  # malformed/truncated pickles raise many types
        raise DataError(f"{path}: malformed or truncated pickle ({type(e).__name__}: {_one_line(e)})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict at the top of the pickle, got {type(obj).__name__}")
    return obj


def _key(d: dict, key: bytes, path: Path) -> Any:
    if key not in d:
        raise DataError(f"{path}: missing key {key!r}")
    return d[key]


def _decode_names(names: Any, path: Path, key: bytes) -> list[str]:
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, (bytes, str)) for n in names):
        raise DataError(f"{path}: key {key!r} must be a list of strings")
    return [n.decode("utf-8", errors="replace") if isinstance(n, bytes) else n for n in names]


def _batch_arrays(path: Path, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Validated (N×32×32×3 uint8 images, int64 labels) from one batch file."""
    d = load_cifar_pickle(path)
    data = _key(d, b"data", path)
    labels_raw = _key(d, label_key, path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        desc = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: key b'data' must be a 2-D uint8 array, got {desc}")
    if data.shape[1] != 3072:
        raise DataError(f"{path}: key b'data' has {data.shape[1]} columns, expected 3072 (3×32×32)")
    if isinstance(labels_raw, np.ndarray):
        labels = labels_raw
    elif isinstance(labels_raw, (list, tuple)) and all(type(v) is int for v in labels_raw):
        labels = np.asarray(labels_raw, dtype=np.int64)
    else:
        raise DataError(f"{path}: key {label_key!r} must be a list of ints")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"{path}: key {label_key!r} must be 1-D integers, got {labels.dtype} shape {labels.shape}")
    labels = labels.astype(np.int64)
    if len(labels) != data.shape[0]:
        raise DataError(f"{path}: key b'data' has {data.shape[0]} rows but {label_key!r} has {len(labels)} labels")
    check_labels(labels, num_classes, path, f"key {label_key!r}")
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, labels


def _folder(root: Path, sub: str, meta: str) -> Path:
    """Accept either the parent folder or the `cifar-*-python` folder itself."""
    if (root / sub).is_dir():
        return root / sub
    if (root / meta).exists():
        return root
    raise DataError(f"{root / sub}: folder not found (expected data.root to contain {sub}/ with {meta} and the batch files)")


def _classes(meta_path: Path, key: bytes) -> list[str]:
    """The class names the meta file lists: their number is the dataset's class count."""
    meta = load_cifar_pickle(meta_path)
    classes = _decode_names(_key(meta, key, meta_path), meta_path, key)
    if not classes:
        raise DataError(f"{meta_path}: key {key!r} lists no class names")
    return classes


def _check_split(split: str, allowed: tuple[str, ...], name: str) -> None:
    if split not in allowed:
        raise DataError(f"data.split: {name} has no split {split!r} (splits: {', '.join(allowed)})")


def read_cifar100(root: Path, split: str) -> ArraySplit:
    """Read `cifar-100-python/{train,test}` with fine labels; the classes are the names `meta` lists."""
    _check_split(split, ("train", "test"), "cifar100")
    d = _folder(Path(root), "cifar-100-python", "meta")
    classes = _classes(d / "meta", b"fine_label_names")
    images, labels = _batch_arrays(d / split, b"fine_labels", len(classes))
    return ArraySplit(images=images, labels=labels, classes=classes)


def read_cifar10(root: Path, split: str) -> ArraySplit:
    """Read `cifar-10-batches-py`: data_batch_1..5 concatenated for train, test_batch for test.

    The classes are the names `batches.meta` lists.
    """
    _check_split(split, ("train", "test"), "cifar10")
    d = _folder(Path(root), "cifar-10-batches-py", "batches.meta")
    classes = _classes(d / "batches.meta", b"label_names")
    files = [d / f"data_batch_{i}" for i in range(1, 6)] if split == "train" else [d / "test_batch"]
    parts = [_batch_arrays(p, b"labels", len(classes)) for p in files]
    if len(parts) == 1:
        images, labels = parts[0]
    else:
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
    return ArraySplit(images=images, labels=labels, classes=classes)


register_format(DatasetFormat(
    name="cifar100", kind="array", num_classes=100, channels=3, image_size=32,
    mean=(0.5071, 0.4867, 0.4408), std=(0.2675, 0.2565, 0.2761),
    train_split="train", eval_split="test", read=read_cifar100,
))

register_format(DatasetFormat(
    name="cifar10", kind="array", num_classes=10, channels=3, image_size=32,
    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
    train_split="train", eval_split="test", read=read_cifar10,
))
