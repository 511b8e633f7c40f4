"""Dataset format readers: round trips on synthetic data in the real layouts, real
Fashion-MNIST when installed, the restricted CIFAR unpickler, and one-line errors that
name the offending file."""

from __future__ import annotations

import gzip
import io
import pickle
import pickletools
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from pipelines import synthetic as syn
from pipelines.errors import DataError
from pipelines.formats import ArraySplit, FileSplit, get_format, list_formats, read_split
from pipelines.formats.cifar import load_cifar_pickle
from pipelines.formats.fashion_mnist import DEBIAN_FASHION_MNIST, FASHION_MNIST_CLASSES


def _raises(match_path: Path | str, fn, *args) -> DataError:
    """Call fn, expect a one-line DataError mentioning `match_path`."""
    with pytest.raises(DataError) as ei:
        fn(*args)
    msg = str(ei.value)
    assert "\n" not in msg, msg
    assert str(match_path) in msg, msg
    return ei.value


def _plain_load(path: Path) -> dict:
    """How people load real CIFAR files (only ever on our own synthetic fixtures here)."""
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


# ---------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------

def test_all_formats_registered_with_facts() -> None:
    assert list_formats() == ["cifar10", "cifar100", "fashion_mnist", "imagenet", "stl10", "tiny_imagenet"]
    facts = {n: (get_format(n).kind, get_format(n).num_classes, get_format(n).channels, get_format(n).image_size)
             for n in list_formats()}
    assert facts == {
        "cifar10": ("array", 10, 3, 32), "cifar100": ("array", 100, 3, 32),
        "fashion_mnist": ("array", 10, 1, 28), "stl10": ("array", 10, 3, 96),
        "tiny_imagenet": ("files", 200, 3, 64), "imagenet": ("files", 1000, 3, 224),
    }
    for n in list_formats():
        f = get_format(n)
        assert len(f.mean) == len(f.std) == f.channels
    assert get_format("cifar100").mean == (0.5071, 0.4867, 0.4408)
    assert get_format("tiny_imagenet").eval_split == "val" and get_format("cifar100").eval_split == "test"


def test_unknown_format_suggests_closest(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="did you mean 'cifar100'"):
        read_split("cifar_100", tmp_path, "train")


def test_missing_root(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    _raises(missing, read_split, "cifar100", missing, "train")


def test_unknown_split(tmp_path: Path) -> None:
    root = syn.write_fashion_mnist(tmp_path, 4, 4)
    with pytest.raises(DataError, match="no split 'val'"):
        read_split("fashion_mnist", root, "val")


# ---------------------------------------------------------------------------------------
# CIFAR
# ---------------------------------------------------------------------------------------

def test_py2_pickle_matches_real_file_shape(tmp_path: Path) -> None:
    root = syn.write_cifar100(tmp_path, 12, 4)
    raw = (root / "cifar-100-python" / "train").read_bytes()
    pickletools.dis(raw, out=io.StringIO())  # well-formed opcode stream
    ops = {op.name for op, _, _ in pickletools.genops(raw)}
    assert {"SHORT_BINSTRING", "BINSTRING"} <= ops
    assert not ops & {"BINBYTES", "SHORT_BINBYTES", "BINUNICODE", "SHORT_BINUNICODE", "STACK_GLOBAL"}
    globals_ = {arg for op, arg, _ in pickletools.genops(raw) if op.name == "GLOBAL"}
    assert globals_ == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}
    # Readable by a plain unpickler the way people load real CIFAR files.
    with open(root / "cifar-100-python" / "train", "rb") as f:
        d = pickle.load(f, encoding="bytes")
    assert d[b"data"].shape == (12, 3072) and d[b"data"].dtype == np.uint8
    assert len(d[b"fine_labels"]) == 12 and isinstance(d[b"filenames"][0], bytes)


@pytest.mark.parametrize("name,writer,n_train,n_test,label_key,sub", [
    ("cifar100", syn.write_cifar100, 37, 11, b"fine_labels", "cifar-100-python"),
    ("cifar10", syn.write_cifar10, 23, 9, b"labels", "cifar-10-batches-py"),
])
def test_cifar_round_trip_pixel_exact(tmp_path: Path, name, writer, n_train, n_test, label_key, sub) -> None:
    root = writer(tmp_path, n_train, n_test, seed=3)
    d = root / sub
    files = ["train"] if name == "cifar100" else [f"data_batch_{i}" for i in range(1, 6)]
    with_plain = [_plain_load(d / f) for f in files]
    data = np.concatenate([b[b"data"] for b in with_plain])
    labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in with_plain])
    for r in (root, d):  # parent folder or the cifar folder itself
        sp = read_split(name, r, "train")
        assert isinstance(sp, ArraySplit)
        assert sp.images.shape == (n_train, 32, 32, 3) and sp.images.dtype == np.uint8
        assert sp.images.flags.c_contiguous
        assert sp.labels.dtype == np.int64
        np.testing.assert_array_equal(sp.labels, labels)
        # channel planes: first 1024 bytes red, row-major
        np.testing.assert_array_equal(sp.images[:, :, :, 0].reshape(n_train, -1), data[:, :1024])
        np.testing.assert_array_equal(sp.images[:, 2, 5, 1], data[:, 1024 + 2 * 32 + 5])
        np.testing.assert_array_equal(sp.images[:, 31, 0, 2], data[:, 2048 + 31 * 32])
    test = read_split(name, root, "test")
    assert test.images.shape == (n_test, 32, 32, 3)
    assert len(sp.classes) == get_format(name).num_classes


def test_cifar_orientation_known_pattern(tmp_path: Path) -> None:
    d = tmp_path / "cifar-100-python"
    img = np.zeros((1, 32, 32, 3), np.uint8)
    img[0, 0, 31, 0] = 200  # top-right red
    img[0, 31, 0, 2] = 100  # bottom-left blue
    rows = img.transpose(0, 3, 1, 2).reshape(1, 3072)
    syn.write_py2_pickle(d / "train", {b"data": rows, b"fine_labels": [7]})
    syn.write_py2_pickle(d / "meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)]})
    sp = read_split("cifar100", tmp_path, "train")
    assert rows[0, 31] == 200 and rows[0, 2048 + 31 * 32] == 100
    np.testing.assert_array_equal(sp.images, img)
    assert sp.labels.tolist() == [7] and sp.classes[7] == "c7"


def test_malicious_pickle_refused_and_marker_absent(tmp_path: Path) -> None:
    d = tmp_path / "cifar-100-python"
    syn.write_cifar100(tmp_path, 4, 4)
    marker = tmp_path / "pwned.txt"
    syn.write_malicious_pickle(d / "train", marker)
    err = _raises(d / "train", read_split, "cifar100", tmp_path, "train")
    assert "builtins.open" in str(err)
    assert not marker.exists()


def test_malicious_fixture_really_is_dangerous(tmp_path: Path) -> None:
    """Proves the refusal test above is meaningful: plain pickle would run the payload."""
    marker = tmp_path / "proof.txt"
    path = syn.write_malicious_pickle(tmp_path / "evil", marker)
    with open(path, "rb") as f:
        obj = pickle.load(f, encoding="bytes")
    obj[b"data"].close()
    assert marker.exists()


@pytest.mark.parametrize("payload,needle", [
    (b"\x80\x02cos\nsystem\nU\x04truer.", "os.system"),
    (b"\x80\x02cnumpy\nload\n.", "numpy.load"),
    (b"\x80\x02cnumpy.core.multiarray\nscalar\n.", "numpy.core.multiarray.scalar"),
    (b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00\x8c\x08builtins\x8c\x04eval\x93.", "builtins.eval"),
    (b"\x80\x02U\x01xQ.", "persistent id"),
])
def test_restricted_unpickler_refuses(tmp_path: Path, payload: bytes, needle: str) -> None:
    path = tmp_path / "bad"
    path.write_bytes(payload)
    err = _raises(path, load_cifar_pickle, path)
    assert needle in str(err)


def test_cifar_malformed_and_truncated(tmp_path: Path) -> None:
    d = tmp_path / "cifar-100-python"
    syn.write_cifar100(tmp_path, 20, 4)
    good = (d / "train").read_bytes()
    (d / "train").write_bytes(good[: len(good) // 2])
    _raises(d / "train", read_split, "cifar100", tmp_path, "train")
    (d / "train").write_bytes(b"not a pickle at all")
    _raises(d / "train", read_split, "cifar100", tmp_path, "train")
    syn.write_py2_pickle(d / "train", [1, 2, 3])
    _raises(d / "train", read_split, "cifar100", tmp_path, "train")


def _cifar_with(tmp_path: Path, train: dict) -> Path:
    d = tmp_path / "cifar-100-python"
    syn.write_py2_pickle(d / "meta", {b"fine_label_names": [b"x"] * 100})
    syn.write_py2_pickle(d / "train", train)
    return d / "train"


@pytest.mark.parametrize("train,needle", [
    ({b"data": np.zeros((3, 3072), np.uint8), b"fine_labels": [0, 1]}, "b'fine_labels'"),
    ({b"data": np.zeros((2, 3000), np.uint8), b"fine_labels": [0, 1]}, "3072"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 100]}, "b'fine_labels'"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, -1]}, "b'fine_labels'"),
    ({b"data": np.zeros((2, 3072), np.int64), b"fine_labels": [0, 1]}, "b'data'"),
    ({b"fine_labels": [0, 1]}, "b'data'"),
    ({b"data": np.zeros((2, 3072), np.uint8)}, "b'fine_labels'"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [b"a", b"b"]}, "b'fine_labels'"),
])
def test_cifar_bad_contents(tmp_path: Path, train: dict, needle: str) -> None:
    path = _cifar_with(tmp_path, train)
    err = _raises(path, read_split, "cifar100", tmp_path, "train")
    assert needle in str(err)


def test_cifar_missing_files(tmp_path: Path) -> None:
    _raises(tmp_path / "cifar-100-python", read_split, "cifar100", tmp_path, "train")
    root = syn.write_cifar10(tmp_path, 10, 2)
    (root / "cifar-10-batches-py" / "data_batch_4").unlink()
    _raises(root / "cifar-10-batches-py" / "data_batch_4", read_split, "cifar10", root, "train")
    (root / "cifar-10-batches-py" / "batches.meta").unlink()
    _raises(root / "cifar-10-batches-py" / "batches.meta", read_split, "cifar10", root, "test")


def test_cifar10_train_is_five_batches_in_order(tmp_path: Path) -> None:
    root = syn.write_cifar10(tmp_path, 50, 10)
    sp = read_split("cifar10", root, "train")
    first = _plain_load(root / "cifar-10-batches-py" / "data_batch_1")
    last = _plain_load(root / "cifar-10-batches-py" / "data_batch_5")
    assert sp.labels[:10].tolist() == first[b"labels"] and sp.labels[-10:].tolist() == last[b"labels"]
    assert sp.classes[0] == "airplane" and len(sp.classes) == 10


def test_synthetic_images_are_class_dependent(tmp_path: Path) -> None:
    """A nearest-class-mean classifier beats chance by far, so tiny runs can learn."""
    root = syn.write_cifar10(tmp_path, 400, 200)
    tr, te = read_split("cifar10", root, "train"), read_split("cifar10", root, "test")
    xtr = tr.images.reshape(len(tr.images), -1).astype(np.float32)
    xte = te.images.reshape(len(te.images), -1).astype(np.float32)
    cent = np.stack([xtr[tr.labels == c].mean(0) for c in range(10)])
    pred = ((xte[:, None] - cent[None]) ** 2).sum(-1).argmin(1)
    assert (pred == te.labels).mean() > 0.5


# ---------------------------------------------------------------------------------------
# Fashion-MNIST
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_round_trip(tmp_path: Path, gz: bool) -> None:
    root = syn.write_fashion_mnist(tmp_path, 30, 12, gz=gz, seed=1)
    suffix = ".gz" if gz else ""
    opener = gzip.open if gz else open
    with opener(root / f"train-images-idx3-ubyte{suffix}", "rb") as f:
        raw = f.read()
    with opener(root / f"train-labels-idx1-ubyte{suffix}", "rb") as f:
        raw_labels = f.read()
    sp = read_split("fashion_mnist", root, "train")
    assert sp.images.shape == (30, 28, 28, 1) and sp.images.dtype == np.uint8 and sp.images.flags.c_contiguous
    np.testing.assert_array_equal(sp.images.reshape(-1), np.frombuffer(raw, np.uint8, offset=16))
    np.testing.assert_array_equal(sp.labels, np.frombuffer(raw_labels, np.uint8, offset=8))
    assert sp.classes == FASHION_MNIST_CLASSES
    assert read_split("fashion_mnist", root, "test").images.shape == (12, 28, 28, 1)


@pytest.mark.skipif(not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").exists(),
                    reason="real Fashion-MNIST not installed (Debian package dataset-fashion-mnist)")
def test_real_fashion_mnist() -> None:
    for split, n in (("train", 60000), ("test", 10000)):
        sp = read_split("fashion_mnist", DEBIAN_FASHION_MNIST, split)
        assert sp.images.shape == (n, 28, 28, 1)
        assert np.bincount(sp.labels, minlength=10).tolist() == [n // 10] * 10
        if split == "test":
            mean = sp.images.mean() / 255.0
            assert abs(mean - get_format("fashion_mnist").mean[0]) < 0.01


def test_fashion_mnist_bad_inputs(tmp_path: Path) -> None:
    root = syn.write_fashion_mnist(tmp_path, 10, 5, gz=False)
    imgs = root / "train-images-idx3-ubyte"
    labs = root / "train-labels-idx1-ubyte"
    good_imgs, good_labs = imgs.read_bytes(), labs.read_bytes()

    imgs.write_bytes(good_imgs[:-100])
    assert "truncated" in str(_raises(imgs, read_split, "fashion_mnist", root, "train"))
    imgs.write_bytes(struct.pack(">I", 2049) + good_imgs[4:])
    assert "magic" in str(_raises(imgs, read_split, "fashion_mnist", root, "train"))
    imgs.write_bytes(good_imgs[:10])
    _raises(imgs, read_split, "fashion_mnist", root, "train")
    imgs.write_bytes(good_imgs)

    labs.write_bytes(struct.pack(">II", 2049, 9) + good_labs[8:17])
    _raises(imgs, read_split, "fashion_mnist", root, "train")  # count mismatch names images and labels
    labs.write_bytes(good_labs[:8] + bytes([10]) + good_labs[9:])
    _raises(labs, read_split, "fashion_mnist", root, "train")
    labs.unlink()
    _raises(labs, read_split, "fashion_mnist", root, "train")


def test_fashion_mnist_truncated_gzip(tmp_path: Path) -> None:
    root = syn.write_fashion_mnist(tmp_path, 50, 5, gz=True)
    path = root / "train-images-idx3-ubyte.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _raises(path, read_split, "fashion_mnist", root, "train")
    path.write_bytes(b"garbage, not gzip")
    _raises(path, read_split, "fashion_mnist", root, "train")


# ---------------------------------------------------------------------------------------
# STL-10
# ---------------------------------------------------------------------------------------

def test_stl10_round_trip_and_orientation(tmp_path: Path) -> None:
    root = syn.write_stl10(tmp_path, 7, 3, n_unlabeled=2, seed=2)
    d = root / "stl10_binary"
    x = np.fromfile(d / "train_X.bin", np.uint8).reshape(7, 3, 96, 96)
    for r in (root, d):
        sp = read_split("stl10", r, "train")
        assert sp.images.shape == (7, 96, 96, 3) and sp.images.flags.c_contiguous
        # on disk each channel is column-major: raw[n, c, col, row]
        np.testing.assert_array_equal(sp.images[:, 10, 70, 1], x[:, 1, 70, 10])
        np.testing.assert_array_equal(sp.labels, np.fromfile(d / "train_y.bin", np.uint8).astype(np.int64) - 1)
    assert sp.classes[0] == "airplane" and sp.labels.min() >= 0
    un = read_split("stl10", root, "unlabeled")
    assert un.images.shape == (2, 96, 96, 3) and un.labels.tolist() == [-1, -1]
    assert read_split("stl10", root, "test").images.shape == (3, 96, 96, 3)

    # A known pattern: a bright row near the top must stay a row after reading.
    img = np.zeros((1, 96, 96, 3), np.uint8)
    img[0, 5, :, 0] = 255  # row 5, red
    img[0, :, 90, 2] = 77  # column 90, blue
    (d / "train_X.bin").write_bytes(syn.stl10_encode(img))
    (d / "train_y.bin").write_bytes(bytes([10]))
    raw = np.frombuffer((d / "train_X.bin").read_bytes(), np.uint8)
    assert raw[5] == 255 and raw[96 + 5] == 255  # first column's row 5, second column's row 5
    sp = read_split("stl10", root, "train")
    np.testing.assert_array_equal(sp.images, img)
    assert sp.labels.tolist() == [9]


def test_stl10_bad_inputs(tmp_path: Path) -> None:
    root = syn.write_stl10(tmp_path, 4, 2)
    d = root / "stl10_binary"
    x = d / "train_X.bin"
    good = x.read_bytes()
    x.write_bytes(good[:-5])
    assert "truncated" in str(_raises(x, read_split, "stl10", root, "train"))
    x.write_bytes(good)
    y = d / "train_y.bin"
    y.write_bytes(bytes([1, 2, 3]))
    _raises(y, read_split, "stl10", root, "train")
    y.write_bytes(bytes([1, 2, 3, 0]))
    _raises(y, read_split, "stl10", root, "train")
    y.unlink()
    _raises(y, read_split, "stl10", root, "train")
    empty = tmp_path / "empty"
    empty.mkdir()
    _raises(empty / "stl10_binary", read_split, "stl10", empty, "train")


# ---------------------------------------------------------------------------------------
# Tiny-ImageNet and ImageNet folders
# ---------------------------------------------------------------------------------------

def test_tiny_imagenet_round_trip(tmp_path: Path) -> None:
    root = syn.write_tiny_imagenet(tmp_path, n_classes=3, per_class_train=4, per_class_val=2, size=16)
    d = root / "tiny-imagenet-200"
    wnids = sorted((d / "wnids.txt").read_text().split())
    ann = {ln.split("\t")[0]: ln.split("\t")[1] for ln in (d / "val" / "val_annotations.txt").read_text().splitlines()}
    for r in (root, d):
        tr = read_split("tiny_imagenet", r, "train")
        assert isinstance(tr, FileSplit) and tr.classes == wnids
        assert len(tr.paths) == 12 and tr.labels.dtype == np.int64
        assert tr.paths == sorted(tr.paths)
        for p, lab in zip(tr.paths, tr.labels):
            assert p.parent.name == "images" and p.parent.parent.name == wnids[lab] and p.is_file()
        va = read_split("tiny_imagenet", r, "val")
        assert len(va.paths) == 6 and [p.name for p in va.paths] == sorted(ann)
        assert [wnids[lab] for lab in va.labels] == [ann[p.name] for p in va.paths]
    from PIL import Image

    with Image.open(tr.paths[0]) as im:
        assert im.format == "JPEG" and im.size == (16, 16)


def test_tiny_imagenet_bad_inputs(tmp_path: Path) -> None:
    root = syn.write_tiny_imagenet(tmp_path / "t", n_classes=2, per_class_train=2, per_class_val=1, size=8)
    d = root / "tiny-imagenet-200"
    ann = d / "val" / "val_annotations.txt"
    text = ann.read_text()
    ann.write_text(text + "val_0.JPEG\tn99999999\t0\t0\t7\t7\n")
    assert "n99999999" in str(_raises(ann, read_split, "tiny_imagenet", root, "val"))
    ann.unlink()
    _raises(ann, read_split, "tiny_imagenet", root, "val")
    ann.write_text(text)

    wnid = sorted((d / "wnids.txt").read_text().split())[1]
    img_dir = d / "train" / wnid / "images"
    for p in img_dir.iterdir():
        p.unlink()
    _raises(img_dir, read_split, "tiny_imagenet", root, "train")

    (d / "wnids.txt").unlink()
    _raises("wnids.txt", read_split, "tiny_imagenet", root, "train")


def test_imagenet_round_trip(tmp_path: Path) -> None:
    root = syn.write_imagenet_folders(tmp_path, n_classes=3, per_class=2, size=24, per_class_val=1)
    classes = sorted(p.name for p in (root / "train").iterdir())
    (root / "train" / classes[0] / "extra.PNG").write_bytes((root / "train" / classes[0] / f"{classes[0]}_0.JPEG").read_bytes())
    (root / "train" / classes[0] / "notes.txt").write_text("not an image")
    tr = read_split("imagenet", root, "train")
    assert tr.classes == classes and len(tr.paths) == 7
    assert np.bincount(tr.labels).tolist() == [3, 2, 2]
    assert all(p.parent.name == classes[lab] for p, lab in zip(tr.paths, tr.labels))
    va = read_split("imagenet", root, "val")
    assert va.classes == classes and va.labels.tolist() == [0, 1, 2]


def test_imagenet_bad_inputs(tmp_path: Path) -> None:
    root = syn.write_imagenet_folders(tmp_path, n_classes=2, per_class=1, size=8)
    w = sorted(p.name for p in (root / "val").iterdir())[1]
    shutil.rmtree(root / "val" / w)
    (root / "val" / w).mkdir()
    _raises(root / "val" / w, read_split, "imagenet", root, "val")
    (root / "val" / "n_bogus").mkdir()
    shutil.rmtree(root / "val" / w)
    _raises(root / "val" / "n_bogus", read_split, "imagenet", root, "val")
    shutil.rmtree(root / "train")
    _raises(root / "train", read_split, "imagenet", root, "train")


# ---------------------------------------------------------------------------------------
# class counts and names come from the data
# ---------------------------------------------------------------------------------------

def _cifar100_with_classes(root: Path, names: list[str], train_labels: list[int], test_labels: list[int]) -> Path:
    d = root / "cifar-100-python"
    for split, labels in (("train", train_labels), ("test", test_labels)):
        syn.write_py2_pickle(d / split, {b"data": np.zeros((len(labels), 3072), np.uint8), b"fine_labels": labels})
    syn.write_py2_pickle(d / "meta", {b"fine_label_names": [n.encode() for n in names]})
    return root


def test_cifar_class_count_is_what_meta_lists(tmp_path: Path) -> None:
    names = [f"kind_{i}" for i in range(20)]
    root = _cifar100_with_classes(tmp_path / "c100", names, list(range(20)) * 2, [19, 0])
    sp = read_split("cifar100", root, "train")
    assert sp.num_classes == 20 and sp.classes == names and sp.class_names == names
    # A label beyond what meta lists is named with its file.
    _cifar100_with_classes(tmp_path / "c100", names, [0, 20], [0])
    err = _raises(tmp_path / "c100" / "cifar-100-python" / "train", read_split, "cifar100", tmp_path / "c100", "train")
    assert "20" in str(err) and "[0, 19]" in str(err)
    # CIFAR-10's batches.meta decides the same way.
    root10 = syn.write_cifar10(tmp_path / "c10", 10, 4)
    meta = root10 / "cifar-10-batches-py" / "batches.meta"
    syn.write_py2_pickle(meta, {b"label_names": [b"a", b"b", b"c", b"d", b"e", b"f", b"g", b"h", b"i", b"j", b"k", b"l"]})
    assert read_split("cifar10", root10, "test").num_classes == 12
    syn.write_py2_pickle(meta, {b"label_names": [b"a", b"b"]})
    _raises(root10 / "cifar-10-batches-py" / "data_batch_1", read_split, "cifar10", root10, "train")


def test_tiny_imagenet_subset_has_its_own_class_count_and_names(tmp_path: Path) -> None:
    root = syn.write_tiny_imagenet(tmp_path, n_classes=10, per_class_train=1, per_class_val=1, size=8)
    d = root / "tiny-imagenet-200"
    words = dict(ln.split("\t") for ln in (d / "words.txt").read_text().splitlines())
    for split in ("train", "val"):
        sp = read_split("tiny_imagenet", root, split)
        assert sp.num_classes == 10 and sp.classes == sorted(words)
        assert sp.class_names == [words[w] for w in sp.classes]
        assert set(sp.labels.tolist()) == set(range(10))
    (d / "words.txt").write_text("".join(f"{w}\tonly this one\n" for w in sorted(words)[:1]))
    sp = read_split("tiny_imagenet", root, "train")
    assert sp.class_names == ["only this one", *sorted(words)[1:]]  # wnid where words.txt has no line


def test_stl10_class_count_is_what_class_names_lists(tmp_path: Path) -> None:
    root = syn.write_stl10(tmp_path, 4, 2)
    d = root / "stl10_binary"
    (d / "class_names.txt").write_text("cat\ndog\nbird\nfish\n")
    (d / "train_y.bin").write_bytes(bytes([1, 2, 3, 4]))
    sp = read_split("stl10", root, "train")
    assert sp.num_classes == 4 and sp.class_names == ["cat", "dog", "bird", "fish"] and sp.labels.tolist() == [0, 1, 2, 3]
    (d / "train_y.bin").write_bytes(bytes([1, 2, 3, 5]))
    assert "1..4" in str(_raises(d / "train_y.bin", read_split, "stl10", root, "train"))


def test_every_format_exposes_count_and_names(tmp_path: Path) -> None:
    fm = read_split("fashion_mnist", syn.write_fashion_mnist(tmp_path / "f", 4, 4), "train")
    assert fm.num_classes == 10 and fm.class_names == FASHION_MNIST_CLASSES
    inet = syn.write_imagenet_folders(tmp_path / "i", n_classes=3, per_class=1, size=8)
    sp = read_split("imagenet", inet, "val")
    assert sp.num_classes == 3 and sp.class_names == sp.classes == sorted(p.name for p in (inet / "train").iterdir())
    from pipelines.formats import head

    tiny = read_split("tiny_imagenet", syn.write_tiny_imagenet(tmp_path / "t", 3, 2, 1, size=8), "train")
    assert head(tiny, 2).class_names == tiny.class_names and head(tiny, 2).num_classes == 3
    with pytest.raises(ValueError):
        ArraySplit(np.zeros((1, 2, 2, 1), np.uint8), np.zeros(1, np.int64), ["a", "b"], ["only one"])


def test_run_data_carries_the_datas_class_count(tmp_path: Path) -> None:
    """A 10-class Tiny-ImageNet folder gives a 10-class run, with words.txt's names, not the format's 200."""
    import torch

    from rrd_fast.config import load_config
    from rrd_fast.data import build_data

    root = syn.write_tiny_imagenet(tmp_path, n_classes=10, per_class_train=2, per_class_val=1, size=8)
    cfg = load_config(None, ["data.format=tiny_imagenet", f"data.root={root}", "data.pipeline=torch",
                             "data.batch_size=4", "data.train_limit=8"])
    data = build_data(cfg.data, 0, 0, 1, torch.device("cpu"))
    assert get_format("tiny_imagenet").num_classes == 200
    assert data.num_classes == 10 and len(data.class_names) == 10
    assert data.class_names[0].startswith("synthetic thing")
    assert len(set(data.train_labels.tolist())) < 10  # the count is the data's class list, not the labels seen


# ---------------------------------------------------------------------------------------
# Fashion-MNIST download
# ---------------------------------------------------------------------------------------

def test_failed_download_leaves_no_folder_behind(tmp_path: Path) -> None:
    from pipelines.formats.fashion_mnist import download_fashion_mnist

    served = syn.write_fashion_mnist(tmp_path / "served", 4, 4, gz=True)
    dest = tmp_path / "data" / "fashion-mnist"
    # A source that serves two files and then fails (a missing third file).
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        shutil.copy(served / name, partial / name)
    with pytest.raises(DataError) as ei:
        download_fashion_mnist(dest, partial.as_uri() + "/", timeout=5)
    assert "\n" not in str(ei.value) and "t10k-images-idx3-ubyte.gz" in str(ei.value)
    assert not (tmp_path / "data").exists()  # the folders it made are gone, parents included
    # An existing folder keeps what it held; only this call's files go.
    dest.mkdir(parents=True)
    (dest / "README").write_text("mine")
    with pytest.raises(DataError):
        download_fashion_mnist(dest, partial.as_uri() + "/", timeout=5)
    assert sorted(p.name for p in dest.iterdir()) == ["README"]
    # A good source: all four files, readable.
    assert download_fashion_mnist(dest, served.as_uri() + "/", timeout=5) == dest
    assert read_split("fashion_mnist", dest, "test").num_classes == 10
    assert not list(dest.glob(".*part"))
