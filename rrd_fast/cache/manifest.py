"""The cache manifest: what a cache was built from, and which of its shards are complete.

The `key` section fingerprints everything that changes the stored values (teacher
weights, training data, augmentation and seed, number of views, dtype, teacher
precision, format version). A run whose own key differs is refused with the list of
differing fields, never silently served another teacher's outputs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.formats import ArraySplit, get_format, head, read_split
from rrd_fast.atomic import write_json_atomic
from rrd_fast.cli import RunError
from rrd_fast.config import DataConfig, RunConfig
from rrd_fast.data import train_augmentation
from rrd_fast.methods.objective import teacher_fields_for
from rrd_fast.precision import resolve_mixed_precision

CACHE_FORMAT = "rrd-fast-teacher-cache/1"
MANIFEST_NAME = "manifest.json"
ALWAYS_STORED = ("logits", "pooled")


class CacheError(RunError):
    """A teacher cache that is missing, incomplete, corrupt, or built for another run."""


def required_fields(cfg: RunConfig) -> tuple[str, ...]:
    """Teacher outputs the run's loss terms read in any stage, plus logits and pooled features (always kept)."""
    return tuple(dict.fromkeys(ALWAYS_STORED + teacher_fields_for(cfg.method)))


def resolved_precision(cfg: RunConfig) -> str:
    """Autocast the teacher runs under in the build: the run's own unless set explicitly."""
    if cfg.teacher.cache_precision != "auto":
        return cfg.teacher.cache_precision
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return resolve_mixed_precision(cfg.train.mixed_precision, device)


def split_fingerprint(format_name: str, root: str | Path, split: Any) -> dict[str, Any]:
    """sha256 over a training split as the run sees it (after train_limit).

    Arrays: shape, pixels and labels. File datasets: relative path, size and label of
    every file (contents are not read; a file replaced by another of the same size and
    name is not noticed).
    """
    n = len(split.labels)
    digest = hashlib.sha256()
    labels = np.ascontiguousarray(np.asarray(split.labels[:n], dtype=np.int64))
    if isinstance(split, ArraySplit):
        images = np.ascontiguousarray(split.images[:n])
        digest.update(f"array {images.dtype} {images.shape}\n".encode())
        digest.update(memoryview(images).cast("B"))
    else:
        root = Path(root)
        digest.update(f"files {n}\n".encode())
        for path in split.paths[:n]:
            path = Path(path)
            rel = path.relative_to(root) if path.is_relative_to(root) else path
            digest.update(f"{rel.as_posix()}\t{path.stat().st_size}\n".encode())
    digest.update(memoryview(labels).cast("B"))
    return {"format": format_name, "num_samples": n, "sha256": digest.hexdigest()}


def dataset_fingerprint(cfg: DataConfig) -> dict[str, Any]:
    """`split_fingerprint` of the config's training split, read from disk (for the build CLI)."""
    fmt = get_format(cfg.format)
    split = head(read_split(fmt.name, cfg.root, fmt.train_split), cfg.train_limit)
    return split_fingerprint(fmt.name, cfg.root, split)


def run_key(cfg: RunConfig, teacher_meta: dict[str, Any], dataset: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything the cached values depend on, for this run config and teacher."""
    fmt = get_format(cfg.data.format)
    spec = train_augmentation(cfg.data, fmt)
    return {
        "format": CACHE_FORMAT,
        "teacher": {"arch": teacher_meta["arch"], "sha256": teacher_meta["sha256"]},
        "dataset": dataset if dataset is not None else dataset_fingerprint(cfg.data),
        "augmentation": {"spec": dataclasses.asdict(spec), "seed": cfg.seed, "mean": list(fmt.mean),
                         "std": list(fmt.std), "image_size": fmt.image_size},
        "views": cfg.teacher.cache_views,
        "dtype": cfg.teacher.cache_dtype,
        "precision": resolved_precision(cfg),
    }


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: tree}


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text[:12] + "…" if len(text) > 16 and all(c in "0123456789abcdef" for c in text) else text


def key_differences(cached: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """`field: cache X, run Y` for every differing leaf of the two keys."""
    a, b = _flatten(json.loads(json.dumps(cached))), _flatten(json.loads(json.dumps(wanted)))
    diffs = []
    for name in sorted(set(a) | set(b)):
        if a.get(name, "<absent>") != b.get(name, "<absent>"):
            diffs.append(f"{name}: cache {_short(a.get(name, '<absent>'))}, run {_short(b.get(name, '<absent>'))}")
    return diffs


def read_manifest(cache_dir: str | Path) -> dict[str, Any] | None:
    """The manifest, or None when the folder holds none yet."""
    path = Path(cache_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CacheError(f"{path}: manifest is not valid JSON ({exc}); rebuild with --rebuild-cache") from None
    for name in ("key", "fields", "tensors", "layout", "shards", "complete"):
        if not isinstance(manifest, dict) or name not in manifest:
            raise CacheError(f"{path}: manifest has no field {name!r}; rebuild with --rebuild-cache")
    return manifest


def write_manifest(cache_dir: str | Path, manifest: dict[str, Any]) -> None:
    write_json_atomic(Path(cache_dir) / MANIFEST_NAME, manifest)


def check_compatible(cache_dir: str | Path, manifest: dict[str, Any], key: dict[str, Any], fields: tuple[str, ...]) -> None:
    """Refuse a cache built for another run, naming every field that differs."""
    path = Path(cache_dir) / MANIFEST_NAME
    diffs = key_differences(manifest["key"], key)
    missing = [f for f in fields if f not in manifest["fields"]]
    if missing:
        diffs.append(f"fields: cache holds {sorted(manifest['fields'])}, run needs {list(fields)}")
    if diffs:
        raise CacheError(f"{path}: teacher cache was built for another run ({'; '.join(diffs)}); "
                         "pass --rebuild-cache to rebuild it")
