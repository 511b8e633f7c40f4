"""Readers for datasets stored as folders of encoded images (Tiny-ImageNet-200, ImageNet).

They only list files (os.scandir) and map them to labels; decoding is the pipeline's job.
Paths are sorted so the sample index of each file is the same on every machine.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipelines.errors import DataError
from pipelines.formats.base import DatasetFormat, FileSplit, register_format

__all__ = ["IMAGE_EXTENSIONS", "read_tiny_imagenet", "read_imagenet", "tiny_imagenet_names"]

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _list_images(folder: Path) -> list[str]:
    """Sorted image file names directly in `folder` (no decoding, one scandir)."""
    try:
        with os.scandir(folder) as it:
            return sorted(e.name for e in it if _is_image(e.name) and e.is_file())
    except FileNotFoundError:
        raise DataError(f"{folder}: folder not found") from None
    except NotADirectoryError:
        raise DataError(f"{folder}: not a folder") from None


def _list_dirs(folder: Path) -> list[str]:
    try:
        with os.scandir(folder) as it:
            return sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir())
    except FileNotFoundError:
        raise DataError(f"{folder}: folder not found") from None
    except NotADirectoryError:
        raise DataError(f"{folder}: not a folder") from None


def _split_check(name: str, split: str) -> None:
    if split not in ("train", "val"):
        raise DataError(f"data.split: {name} has no split {split!r} (splits: train, val)")


# ---------------------------------------------------------------------------------------
# Tiny-ImageNet-200
# ---------------------------------------------------------------------------------------

def _tiny_root(root: Path) -> Path:
    """Accept the `tiny-imagenet-200` folder or its parent."""
    for cand in (root, root / "tiny-imagenet-200"):
        if (cand / "wnids.txt").is_file():
            return cand
    raise DataError(f"{root / 'wnids.txt'}: file not found (expected a tiny-imagenet-200 folder, or its parent, as data.root)")


def _tiny_wnids(d: Path) -> list[str]:
    path = d / "wnids.txt"
    wnids = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    if not wnids:
        raise DataError(f"{path}: lists no class ids")
    if len(set(wnids)) != len(wnids):
        raise DataError(f"{path}: lists a class id more than once")
    return sorted(wnids)


def _words(d: Path, wnids: list[str]) -> dict[str, str]:
    path = d / "words.txt"
    if not path.is_file():
        return {}
    wanted = set(wnids)
    names: dict[str, str] = {}
    for ln in path.read_text(encoding="utf-8", errors="replace").splitlines():
        wnid, _, name = ln.partition("\t")
        if wnid in wanted and name.strip():
            names[wnid] = name.strip()
    return names


def tiny_imagenet_names(root: str | Path) -> dict[str, str]:
    """wnid -> human-readable name from `words.txt` (empty if the file is absent).

    `words.txt` covers all of WordNet (82k lines); only the lines of the listed wnids are kept.
    """
    d = _tiny_root(Path(root))
    return _words(d, _tiny_wnids(d))


def read_tiny_imagenet(root: Path, split: str) -> FileSplit:
    """Train files from `train/<wnid>/images/`, val files labelled by `val/val_annotations.txt`.

    The classes are the wnids `wnids.txt` lists (sorted), however many; their readable
    names come from `words.txt` (the wnid itself where it has no line).
    """
    _split_check("tiny_imagenet", split)
    d = _tiny_root(Path(root))
    classes = _tiny_wnids(d)
    words = _words(d, classes)
    class_names = [words.get(w, w) for w in classes]
    index = {w: i for i, w in enumerate(classes)}
    paths: list[Path] = []
    labels: list[int] = []
    if split == "train":
        train = d / "train"
        if not train.is_dir():
            raise DataError(f"{train}: folder not found")
        present = set(_list_dirs(train))
        extra = sorted(present - set(classes))
        if extra:
            raise DataError(f"{train / extra[0]}: class folder not listed in {d / 'wnids.txt'}")
        for w in classes:
            img_dir = train / w / "images"
            if w not in present:
                raise DataError(f"{train / w}: class folder missing (listed in wnids.txt)")
            names = _list_images(img_dir)
            if not names:
                raise DataError(f"{img_dir}: class folder has no images")
            paths.extend(img_dir / n for n in names)
            labels.extend([index[w]] * len(names))
    else:
        ann = d / "val" / "val_annotations.txt"
        if not ann.is_file():
            raise DataError(f"{ann}: file not found (Tiny-ImageNet val labels)")
        img_dir = d / "val" / "images"
        on_disk = set(_list_images(img_dir))
        rows: list[tuple[str, int]] = []
        for lineno, ln in enumerate(ann.read_text(encoding="utf-8").splitlines(), 1):
            if not ln.strip():
                continue
            fields = ln.split("\t")
            if len(fields) < 2:
                raise DataError(f"{ann}:{lineno}: expected tab-separated 'file<TAB>wnid<TAB>box', got {ln.strip()!r}")
            name, wnid = fields[0].strip(), fields[1].strip()
            if wnid not in index:
                raise DataError(f"{ann}:{lineno}: class id {wnid!r} is not in wnids.txt")
            if name not in on_disk:
                raise DataError(f"{ann}:{lineno}: image {img_dir / name} not found")
            rows.append((name, index[wnid]))
        if not rows:
            raise DataError(f"{ann}: no annotations")
        rows.sort()
        for i in range(1, len(rows)):
            if rows[i][0] == rows[i - 1][0]:
                raise DataError(f"{ann}: image {rows[i][0]!r} annotated more than once")
        paths = [img_dir / n for n, _ in rows]
        labels = [lab for _, lab in rows]
    return FileSplit(paths=paths, labels=np.asarray(labels, dtype=np.int64), classes=classes, class_names=class_names)


# ---------------------------------------------------------------------------------------
# ImageNet (class-per-folder train and val)
# ---------------------------------------------------------------------------------------

def read_imagenet(root: Path, split: str) -> FileSplit:
    """`train/<wnid>/*` and `val/<wnid>/*`; the classes (ids and names) are the sorted train folder names."""
    _split_check("imagenet", split)
    root = Path(root)
    train = root / "train"
    if not train.is_dir():
        raise DataError(f"{train}: folder not found (expected data.root to contain train/<wnid>/ and val/<wnid>/)")
    classes = _list_dirs(train)
    if not classes:
        raise DataError(f"{train}: no class folders")
    index = {w: i for i, w in enumerate(classes)}
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: folder not found")
    folders = _list_dirs(split_dir)
    if split != "train":
        unknown = [w for w in folders if w not in index]
        if unknown:
            raise DataError(f"{split_dir / unknown[0]}: class folder not present in {train}")
        if not folders:
            loose = _list_images(split_dir)
            hint = " (images lie directly in it; sort them into val/<wnid>/ folders first)" if loose else ""
            raise DataError(f"{split_dir}: no class folders{hint}")
    paths: list[Path] = []
    labels: list[int] = []
    for w in folders:
        folder = split_dir / w
        names = _list_images(folder)
        if not names:
            raise DataError(f"{folder}: class folder has no images")
        paths.extend(folder / n for n in names)
        labels.extend([index[w]] * len(names))
    return FileSplit(paths=paths, labels=np.asarray(labels, dtype=np.int64), classes=classes)


register_format(DatasetFormat(
    name="tiny_imagenet", kind="files", num_classes=200, channels=3, image_size=64,
    mean=(0.4802, 0.4481, 0.3975), std=(0.2770, 0.2691, 0.2821),
    train_split="train", eval_split="val", read=read_tiny_imagenet,
))

register_format(DatasetFormat(
    name="imagenet", kind="files", num_classes=1000, channels=3, image_size=224,
    mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
    train_split="train", eval_split="val", read=read_imagenet,
))
