"""Small datasets written in the real on-disk layouts.

Tests and benchmarks need data that exercises exactly the code paths real downloads do
(Python-2 CIFAR pickles, IDX headers, STL's column-major channels, JPEG folder trees),
without shipping or downloading anything. Images are class-dependent (a coloured blob
whose colour and position depend on the class, plus noise) so that a short training run
on them can actually learn.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "class_images",
    "py2_pickle_bytes",
    "write_py2_pickle",
    "write_cifar100",
    "write_cifar10",
    "write_fashion_mnist",
    "write_stl10",
    "stl10_encode",
    "write_tiny_imagenet",
    "write_imagenet_folders",
    "write_malicious_pickle",
    "FASHION_MNIST_CLASSES",
    "STL10_CLASSES",
    "CIFAR10_CLASSES",
]

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


# ---------------------------------------------------------------------------------------
# Class-dependent images
# ---------------------------------------------------------------------------------------

def _class_style(num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class blob colour (0..255), blob centre (fractions of the side) and stripe wave vector.

    Fixed by the class index alone, so train and test splits written with different seeds
    (or by separate calls) share the same class appearance.
    """
    rng = np.random.default_rng(0x5EED_C1A5)
    colours = rng.uniform(20, 235, size=(num_classes, 3))
    centres = rng.uniform(0.25, 0.75, size=(num_classes, 2))
    angle = rng.uniform(0, np.pi, size=num_classes)
    freq = rng.uniform(1.5, 6.0, size=num_classes) * 2 * np.pi
    waves = np.stack([np.cos(angle) * freq, np.sin(angle) * freq], axis=1)
    return colours, centres, waves


def class_images(labels: np.ndarray, size: int, channels: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 N×size×size×channels images whose content depends on the label.

    Each image is a grey background with a class-specific stripe texture and a soft blob in
    the class colour at a class-specific position, with per-sample jitter and pixel noise.
    Grayscale uses the colour's luminance.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    out = np.empty((n, size, size, channels), dtype=np.uint8)
    colours, centres, waves = _class_style(num_classes)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    sigma = 0.16
    chunk = 1024
    for start in range(0, n, chunk):
        lab = labels[start:start + chunk]
        m = len(lab)
        c = (centres[lab] + rng.normal(0.0, 0.03, size=(m, 2))).astype(np.float32)
        d2 = (yy[None] - c[:, 0, None, None]) ** 2 + (xx[None] - c[:, 1, None, None]) ** 2
        mask = np.exp(d2 * np.float32(-1.0 / (2 * sigma * sigma)))[..., None]
        phase = rng.uniform(0, 2 * np.pi, size=(m, 1, 1)).astype(np.float32)
        w = waves[lab].astype(np.float32)
        stripes = np.sin(w[:, 0, None, None] * yy[None] + w[:, 1, None, None] * xx[None] + phase)
        col = colours[lab].astype(np.float32)
        if channels == 1:
            col = (col @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[:, None]
        else:
            col = col[:, :channels]
        bg = rng.uniform(105, 150, size=(m, 1, 1, 1)).astype(np.float32) + np.float32(35.0) * stripes[..., None]
        img = bg * (1 - mask) + col[:, None, None, :] * mask
        img += rng.standard_normal(size=img.shape, dtype=np.float32) * np.float32(12.0)
        out[start:start + m] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out


def _balanced_labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Labels with every class as equally represented as n allows, in random order."""
    return rng.permutation(np.arange(n, dtype=np.int64) % num_classes)


# ---------------------------------------------------------------------------------------
# Python-2 style pickle emitter (what real CIFAR files contain)
# ---------------------------------------------------------------------------------------

class _Py2PickleWriter:
    """Emit protocol-2 opcodes the way Python 2's cPickle wrote the CIFAR files.

    Python 3's pickler writes `bytes` as `_codecs.encode(...)` calls under protocol 2, which
    real CIFAR files never contain. Here byte strings (and `str`) become py2 `str` opcodes
    (SHORT_BINSTRING / BINSTRING), and numpy arrays use only the three globals real files
    use: numpy.core.multiarray._reconstruct, numpy.ndarray and numpy.dtype.
    """

    def __init__(self) -> None:
        self.parts: list[bytes] = [b"\x80\x02"]  # PROTO 2

    def _w(self, b: bytes) -> None:
        self.parts.append(b)

    def string(self, s: bytes) -> None:
        if len(s) < 256:
            self._w(b"U" + bytes([len(s)]) + s)  # SHORT_BINSTRING
        else:
            self._w(b"T" + struct.pack("<I", len(s)))  # BINSTRING
            self._w(s)

    def integer(self, v: int) -> None:
        if 0 <= v < 256:
            self._w(b"K" + bytes([v]))  # BININT1
        elif 0 <= v < 65536:
            self._w(b"M" + struct.pack("<H", v))  # BININT2
        elif -(2**31) <= v < 2**31:
            self._w(b"J" + struct.pack("<i", v))  # BININT
        else:
            raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
            self._w(b"\x8a" + bytes([len(raw)]) + raw)  # LONG1

    def tuple_(self, items: tuple) -> None:
        if not items:
            self._w(b")")
            return
        if len(items) <= 3:
            for it in items:
                self.obj(it)
            self._w(b"\x85\x86\x87"[len(items) - 1:len(items)])  # TUPLE1/2/3
            return
        self._w(b"(")
        for it in items:
            self.obj(it)
        self._w(b"t")

    def dtype(self, dt: np.dtype) -> None:
        if dt.hasobject or dt.fields is not None or dt.subdtype is not None:
            raise ValueError(f"py2 pickle emitter supports plain numeric dtypes only, not {dt}")
        self._w(b"cnumpy\ndtype\n")
        self.tuple_((f"{dt.kind}{dt.itemsize}".encode(), 0, 1))
        self._w(b"R")  # REDUCE
        byteorder = dt.byteorder
        if byteorder == "=":
            byteorder = "<" if np.little_endian else ">"
        self.tuple_((3, byteorder.encode(), None, None, None, -1, -1, 0))
        self._w(b"b")  # BUILD

    def ndarray(self, a: np.ndarray) -> None:
        self._w(b"cnumpy.core.multiarray\n_reconstruct\n")
        self._w(b"cnumpy\nndarray\n")
        self.tuple_((0,))
        self.string(b"b")
        self._w(b"\x87R")  # TUPLE3, REDUCE
        self._w(b"(")
        self.integer(1)
        self.tuple_(tuple(int(s) for s in a.shape))
        self.dtype(a.dtype)
        self._w(b"\x89")  # NEWFALSE: not Fortran order
        self.string(np.ascontiguousarray(a).tobytes())
        self._w(b"tb")  # TUPLE, BUILD

    def obj(self, x: Any) -> None:
        if x is None:
            self._w(b"N")
        elif isinstance(x, bool):
            self._w(b"\x88" if x else b"\x89")
        elif isinstance(x, (int, np.integer)):
            self.integer(int(x))
        elif isinstance(x, bytes):
            self.string(x)
        elif isinstance(x, str):
            self.string(x.encode("utf-8"))
        elif isinstance(x, np.ndarray):
            self.ndarray(x)
        elif isinstance(x, tuple):
            self.tuple_(x)
        elif isinstance(x, list):
            self._w(b"]")  # EMPTY_LIST
            for i in range(0, len(x), 1000):  # cPickle batched APPENDS by 1000
                self._w(b"(")
                for it in x[i:i + 1000]:
                    self.obj(it)
                self._w(b"e")
        elif isinstance(x, dict):
            self._w(b"}")  # EMPTY_DICT
            items = list(x.items())
            for i in range(0, len(items), 1000):
                self._w(b"(")
                for k, v in items[i:i + 1000]:
                    self.obj(k)
                    self.obj(v)
                self._w(b"u")
        else:
            raise TypeError(f"py2 pickle emitter cannot write {type(x).__name__}")

    def finish(self) -> bytes:
        self._w(b".")
        return b"".join(self.parts)


def py2_pickle_bytes(obj: Any) -> bytes:
    """Serialise dicts/lists/tuples/ints/bytes/str/None/uint8 arrays as a Python-2 cPickle would."""
    w = _Py2PickleWriter()
    w.obj(obj)
    return w.finish()


def write_py2_pickle(path: str | Path, obj: Any) -> Path:
    """Write `obj` as a Python-2 style protocol-2 pickle (see `py2_pickle_bytes`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(py2_pickle_bytes(obj))
    return path


def write_malicious_pickle(path: str | Path, marker_file: str | Path) -> Path:
    """A CIFAR-shaped pickle whose b"data" value is `builtins.open(marker_file, "w")`.

    Unpickled without restrictions it creates `marker_file`; a safe reader must refuse the
    `builtins.open` global before calling anything, so the marker never appears.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    marker = str(marker_file).encode("utf-8")
    body = (
        b"\x80\x02}("  # PROTO 2, EMPTY_DICT, MARK
        + b"U\x04data"
        + b"cbuiltins\nopen\n"
        + b"X" + struct.pack("<I", len(marker)) + marker  # BINUNICODE path
        + b"X\x01\x00\x00\x00w"  # BINUNICODE mode
        + b"\x86R"  # TUPLE2, REDUCE -> open(marker, "w")
        + b"U\x0bfine_labels]"
        + b"u."  # SETITEMS, STOP
    )
    path.write_bytes(body)
    return path


# ---------------------------------------------------------------------------------------
# CIFAR
# ---------------------------------------------------------------------------------------

def _cifar_rows(images: np.ndarray) -> np.ndarray:
    """N×32×32×3 -> N×3072 rows: all red, then green, then blue, each row-major."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), 3072)


def _cifar_filenames(labels: np.ndarray, prefix: str) -> list[bytes]:
    return [f"{prefix}_{i:05d}_c{int(l)}.png".encode() for i, l in enumerate(labels)]


def write_cifar100(root: str | Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Write `root/cifar-100-python/{train,test,meta}` as Python-2 pickles; returns `root`."""
    root = Path(root)
    d = root / "cifar-100-python"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    fine_names = [f"class_{i:02d}".encode() for i in range(100)]
    coarse_names = [f"super_{i:02d}".encode() for i in range(20)]
    for split, n in (("train", n_train), ("test", n_test)):
        labels = _balanced_labels(n, 100, rng)
        imgs = class_images(labels, 32, 3, 100, rng)
        write_py2_pickle(d / split, {
            b"filenames": _cifar_filenames(labels, split),
            b"batch_label": f"{split}ing batch 1 of 1".encode(),
            b"fine_labels": [int(v) for v in labels],
            b"coarse_labels": [int(v) // 5 for v in labels],
            b"data": _cifar_rows(imgs),
        })
    write_py2_pickle(d / "meta", {b"fine_label_names": fine_names, b"coarse_label_names": coarse_names})
    return root


def write_cifar10(root: str | Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Write `root/cifar-10-batches-py/` (5 train batches, test batch, meta); returns `root`."""
    root = Path(root)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = _balanced_labels(n_train, 10, rng)
    imgs = class_images(labels, 32, 3, 10, rng)
    bounds = np.linspace(0, n_train, 6).astype(int)
    for b in range(5):
        lo, hi = bounds[b], bounds[b + 1]
        write_py2_pickle(d / f"data_batch_{b + 1}", {
            b"batch_label": f"training batch {b + 1} of 5".encode(),
            b"labels": [int(v) for v in labels[lo:hi]],
            b"data": _cifar_rows(imgs[lo:hi]),
            b"filenames": _cifar_filenames(labels[lo:hi], f"train{b + 1}"),
        })
    labels = _balanced_labels(n_test, 10, rng)
    imgs = class_images(labels, 32, 3, 10, rng)
    write_py2_pickle(d / "test_batch", {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": [int(v) for v in labels],
        b"data": _cifar_rows(imgs),
        b"filenames": _cifar_filenames(labels, "test"),
    })
    write_py2_pickle(d / "batches.meta", {
        b"num_cases_per_batch": int(bounds[1] - bounds[0]),
        b"label_names": [c.encode() for c in CIFAR10_CLASSES],
        b"num_vis": 3072,
    })
    return root


# ---------------------------------------------------------------------------------------
# Fashion-MNIST (IDX)
# ---------------------------------------------------------------------------------------

def _write_maybe_gz(path: Path, data: bytes, gz: bool) -> Path:
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb", compresslevel=6) as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def write_fashion_mnist(root: str | Path, n_train: int, n_test: int, gz: bool = True, seed: int = 0) -> Path:
    """Write the four IDX files (gzipped like the Debian package, or raw) into `root`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = _balanced_labels(n, 10, rng)
        imgs = class_images(labels, 28, 1, 10, rng)
        _write_maybe_gz(root / f"{prefix}-images-idx3-ubyte", struct.pack(">IIII", 2051, n, 28, 28) + imgs.tobytes(), gz)
        _write_maybe_gz(root / f"{prefix}-labels-idx1-ubyte", struct.pack(">II", 2049, n) + labels.astype(np.uint8).tobytes(), gz)
    return root


# ---------------------------------------------------------------------------------------
# STL-10 binary
# ---------------------------------------------------------------------------------------

def stl10_encode(images: np.ndarray) -> bytes:
    """N×96×96×3 row-major -> STL's on-disk bytes (per image: 3 channels, each column-major)."""
    return np.ascontiguousarray(images.transpose(0, 3, 2, 1)).tobytes()


def write_stl10(root: str | Path, n_train: int, n_test: int, n_unlabeled: int = 0, seed: int = 0) -> Path:
    """Write `root/stl10_binary/` (X/y .bin files and class_names.txt); returns `root`."""
    root = Path(root)
    d = root / "stl10_binary"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = _balanced_labels(n, 10, rng)
        (d / f"{split}_X.bin").write_bytes(stl10_encode(class_images(labels, 96, 3, 10, rng)))
        (d / f"{split}_y.bin").write_bytes((labels + 1).astype(np.uint8).tobytes())
    labels = rng.integers(0, 10, size=n_unlabeled)
    (d / "unlabeled_X.bin").write_bytes(stl10_encode(class_images(labels, 96, 3, 10, rng)))
    (d / "class_names.txt").write_text("\n".join(STL10_CLASSES) + "\n")
    return root


# ---------------------------------------------------------------------------------------
# JPEG folder trees
# ---------------------------------------------------------------------------------------

def _save_jpeg(path: Path, img: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(img).save(path, format="JPEG", quality=90)


def _wnids(n_classes: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed + 7919)
    ids = rng.choice(10**8, size=n_classes, replace=False)
    return [f"n{int(i):08d}" for i in ids]


def write_tiny_imagenet(
    root: str | Path, n_classes: int, per_class_train: int, per_class_val: int, seed: int = 0, size: int = 64
) -> Path:
    """Write `root/tiny-imagenet-200/` with wnids.txt, words.txt, train/ and val/ as the real archive has it.

    Returns `root`; the reader accepts either `root` or the `tiny-imagenet-200` folder.
    """
    root = Path(root)
    d = root / "tiny-imagenet-200"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    wnids = _wnids(n_classes, seed)
    # The real wnids.txt is not sorted; readers must sort.
    (d / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    (d / "words.txt").write_text("".join(f"{w}\tsynthetic thing {i}, thing{i}\n" for i, w in enumerate(wnids)))
    for ci, w in enumerate(wnids):
        img_dir = d / "train" / w / "images"
        img_dir.mkdir(parents=True, exist_ok=True)
        imgs = class_images(np.full(per_class_train, ci), size, 3, n_classes, rng)
        boxes = []
        for i, img in enumerate(imgs):
            name = f"{w}_{i}.JPEG"
            _save_jpeg(img_dir / name, img)
            boxes.append(f"{name}\t0\t0\t{size - 1}\t{size - 1}\n")
        (d / "train" / w / f"{w}_boxes.txt").write_text("".join(boxes))
    val_dir = d / "val" / "images"
    val_dir.mkdir(parents=True, exist_ok=True)
    val_labels = rng.permutation(np.repeat(np.arange(n_classes), per_class_val))
    imgs = class_images(val_labels, size, 3, n_classes, rng)
    lines = []
    for i, (lab, img) in enumerate(zip(val_labels, imgs)):
        name = f"val_{i}.JPEG"
        _save_jpeg(val_dir / name, img)
        lines.append(f"{name}\t{wnids[lab]}\t0\t0\t{size - 1}\t{size - 1}\n")
    (d / "val" / "val_annotations.txt").write_text("".join(lines))
    return root


def write_imagenet_folders(
    root: str | Path, n_classes: int, per_class: int, size: int, seed: int = 0, per_class_val: int | None = None
) -> Path:
    """Write `root/train/<wnid>/*.JPEG` and `root/val/<wnid>/*.JPEG`; returns `root`.

    `per_class_val` defaults to `per_class`.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    wnids = sorted(_wnids(n_classes, seed))
    n_val = per_class if per_class_val is None else per_class_val
    counter = 0
    for ci, w in enumerate(wnids):
        for split, n in (("train", per_class), ("val", n_val)):
            folder = root / split / w
            folder.mkdir(parents=True, exist_ok=True)
            for i, img in enumerate(class_images(np.full(n, ci), size, 3, n_classes, rng)):
                if split == "train":
                    name = f"{w}_{i}.JPEG"
                else:
                    counter += 1
                    name = f"ILSVRC2012_val_{counter:08d}.JPEG"
                _save_jpeg(folder / name, img)
    return root
