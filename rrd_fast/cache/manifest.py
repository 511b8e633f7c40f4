"""The cache manifest: what a cache was built from, and which of its shards are complete.

The `key` section fingerprints everything that changes the stored values (teacher
weights, training data, augmentation and seed, number of views, dtype, teacher
precision, format version). A run whose own key differs is refused with the list of
differing fields, never silently served another teacher's outputs.

`CacheSpec` is the manifest's schema. Every manifest read is validated against it before
any value is used: a wrong type, a shard name that is not a shard, or a layout so large
that merely listing its shards would exhaust memory is one line naming the file and field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.formats import ArraySplit, get_format, head, read_split
from rrd_fast.atomic import read_json_object, write_json_atomic
from rrd_fast.checkpoint import SHA256_PATTERN, JsonFields
from rrd_fast.cli import RunError
from rrd_fast.config import DataConfig, RunConfig
from rrd_fast.data import train_augmentation
from rrd_fast.methods.objective import teacher_fields_for
from rrd_fast.precision import resolve_mixed_precision

CACHE_FORMAT = "rrd-fast-teacher-cache/1"
MANIFEST_NAME = "manifest.json"
ALWAYS_STORED = ("logits", "pooled")
CACHE_DTYPES = ("fp16", "bf16", "fp32")

# Bounds on what a manifest may describe: generous for any real dataset (ImageNet-21k has 14M
# images), small enough that the reader's list of shards and row shapes always fits in memory.
MAX_SAMPLES = 100_000_000
MAX_VIEWS = 10_000
MAX_SHARDS = 1_000_000
MAX_TENSORS = 256
MAX_ROW_ELEMENTS = 1 << 24
SHARD_NAME_PATTERN = re.compile(r"view-\d{4,}\.rows-\d{8,}\.safetensors")


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


@dataclass(frozen=True)
class CacheLayout:
    num_samples: int
    views: int
    samples_per_shard: int

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ShardRecord:
    """One complete shard: its view, row range [start, stop), size and sha256."""

    view: int
    start: int
    stop: int
    bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class CacheSpec:
    """The cache manifest (`manifest.json`). `key` stays a JSON object: it is compared as a whole."""

    key: dict[str, Any]
    fields: tuple[str, ...]
    tensors: dict[str, list[int]]
    layout: CacheLayout
    shards: dict[str, ShardRecord]
    complete: bool
    teacher_info: dict[str, Any] | None = None
    info: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def dtype(self) -> str:
        return str(self.key["dtype"])

    @classmethod
    def from_dict(cls, data: Any, where: str | Path = MANIFEST_NAME) -> CacheSpec:
        """Validate a manifest (types, bounds, shard names and ranges) and build the spec."""
        hint = "; rebuild with --rebuild-cache"

        def error(message: str) -> CacheError:
            return CacheError(message + hint)

        f = JsonFields(data, where, error)
        key = f.object("key")
        dtype = key.str("dtype")
        if dtype not in CACHE_DTYPES:
            raise key.fail("dtype", dtype, f"one of {', '.join(CACHE_DTYPES)}")
        names = f.list("fields", MAX_TENSORS)
        if not all(isinstance(n, str) and n for n in names):
            raise f.fail("fields", names, "a list of teacher output names")
        tensors = f.object("tensors")
        if not 1 <= len(tensors.data) <= MAX_TENSORS:
            raise f.fail("tensors", tensors.data, f"an object of 1..{MAX_TENSORS} tensor shapes")
        for name, shape in tensors.data.items():
            if not isinstance(shape, list) or len(shape) > 8 or not all(
                    isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape) \
                    or math.prod(shape) > MAX_ROW_ELEMENTS:
                raise tensors.fail(name, shape, f"a list of positive dimensions, at most {MAX_ROW_ELEMENTS} "
                                                "elements per sample")
        lay = f.object("layout")
        layout = CacheLayout(lay.int("num_samples", 1, MAX_SAMPLES), lay.int("views", 1, MAX_VIEWS),
                             lay.int("samples_per_shard", 1, MAX_SAMPLES))
        planned = layout.views * -(-layout.num_samples // layout.samples_per_shard)
        if planned > MAX_SHARDS:
            raise lay.fail("samples_per_shard", layout.samples_per_shard,
                           f"a value giving at most {MAX_SHARDS} shards ({planned} planned)")
        entries = f.object("shards")
        if len(entries.data) > planned:
            raise error(f"{f.where}: field 'shards' has {len(entries.data)} entries, expected at most the "
                        f"{planned} shards the layout plans")
        shards = {}
        for name in entries.data:
            if not SHARD_NAME_PATTERN.fullmatch(str(name)):
                raise entries.fail(str(name), entries.data[name], "a shard named view-NNNN.rows-NNNNNNNN.safetensors")
            e = entries.object(name)
            record = ShardRecord(e.int("view", 0, layout.views - 1), e.int("start", 0, layout.num_samples - 1),
                                 e.int("stop", 1, layout.num_samples), e.int("bytes", 0),
                                 e.str("sha256", pattern=SHA256_PATTERN, expected="64 lowercase hex digits"))
            if not record.start < record.stop <= record.start + layout.samples_per_shard:
                raise e.fail("stop", record.stop, f"a row range of 1..{layout.samples_per_shard} rows after "
                                                  f"start {record.start}")
            shards[str(name)] = record
        teacher_info = f.object("teacher_info", optional=True)
        info = f.object("info", optional=True)
        known = {"key", "fields", "tensors", "layout", "shards", "complete", "teacher_info", "info"}
        return cls(
            key=json.loads(json.dumps(key.data)), fields=tuple(names),
            tensors={str(k): list(v) for k, v in tensors.data.items()}, layout=layout, shards=shards,
            complete=f.bool("complete"), teacher_info=None if teacher_info is None else dict(teacher_info.data),
            info=None if info is None else dict(info.data), extra=f.extras(known),
        )

    def to_dict(self) -> dict[str, Any]:
        """The manifest as JSON data (what the builder writes and updates)."""
        out: dict[str, Any] = {
            **self.extra, "key": json.loads(json.dumps(self.key)), "fields": list(self.fields),
            "tensors": {k: list(v) for k, v in self.tensors.items()}, "layout": self.layout.to_dict(),
            "shards": {name: r.to_dict() for name, r in self.shards.items()}, "complete": self.complete,
        }
        if self.teacher_info is not None:
            out["teacher_info"] = json.loads(json.dumps(self.teacher_info))
        if self.info is not None:
            out["info"] = json.loads(json.dumps(self.info))
        return out


def read_cache_spec(cache_dir: str | Path) -> CacheSpec | None:
    """The validated manifest, or None when the folder holds none yet."""
    path = Path(cache_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    return CacheSpec.from_dict(read_json_object(path, lambda m: CacheError(f"{m}; rebuild with --rebuild-cache")), path)


def read_manifest(cache_dir: str | Path) -> dict[str, Any] | None:
    """`read_cache_spec` as a plain dict (the form the builder updates), or None."""
    spec = read_cache_spec(cache_dir)
    return None if spec is None else spec.to_dict()


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
