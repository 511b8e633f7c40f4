"""Cache shards: dense safetensors files of teacher outputs for a row range of one view.

Writing: the whole file is serialised in memory, hashed, and written atomically
(temporary file, fsync, rename), so a shard either exists complete or not at all.
Reading: the header is parsed here, the data region memory-mapped, and rows gathered
with `np.take`, one vectorised gather for a whole batch of random rows, where
`safe_open(...).get_slice(name)` takes slices only, so one read per row, which is far
slower (`python -m rrd_fast.bench cache --only gather` measures both). numpy also reads
bf16 as raw uint16.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes

from rrd_fast.atomic import atomic_path
from rrd_fast.cache.manifest import CACHE_FORMAT, MANIFEST_NAME, CacheError, CacheSpec
from rrd_fast.checkpoint import sha256_file

# cache dtype name -> (torch dtype, numpy dtype used to read the raw bytes, safetensors dtype tag)
DTYPES: dict[str, tuple[torch.dtype, np.dtype, str]] = {
    "fp16": (torch.float16, np.dtype(np.float16), "F16"),
    "bf16": (torch.bfloat16, np.dtype(np.uint16), "BF16"),  # numpy has no bfloat16: read bits, view in torch
    "fp32": (torch.float32, np.dtype(np.float32), "F32"),
}

FaultHook = Callable[[str, int], None]


def shard_name(view: int, start: int) -> str:
    return f"view-{view:04d}.rows-{start:08d}.safetensors"


def plan_shards(num_samples: int, views: int, per_shard: int) -> list[dict[str, Any]]:
    """Every shard of a cache, view-major: name, view, and the row range [start, stop)."""
    return [{"name": shard_name(v, s), "view": v, "start": s, "stop": min(s + per_shard, num_samples)}
            for v in range(views) for s in range(0, num_samples, per_shard)]


def write_shard(path: Path, tensors: dict[str, torch.Tensor], index: int, fault: FaultHook | None = None) -> dict[str, Any]:
    """Write one shard atomically; returns its size and sha256 for the manifest.

    `fault` is a test hook called at ("tmp_written", index) between writing the
    temporary file and renaming it; tests kill the process there.
    """
    blob = safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                             metadata={"format": CACHE_FORMAT})
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(blob)
        if fault is not None:
            fault("tmp_written", index)
    return {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}


def check_size(path: Path, entry: dict[str, Any]) -> None:
    if not path.is_file():
        raise CacheError(f"{path}: cache shard missing; rebuild with --rebuild-cache")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise CacheError(f"{path}: cache shard is {size} bytes, manifest says {entry['bytes']} "
                         "(truncated or overwritten); rebuild with --rebuild-cache")


class ShardFile:
    """One verified, memory-mapped shard; `arrays[name]` are zero-copy views of its rows."""

    def __init__(self, path: Path, entry: dict[str, Any], tensors: dict[str, list[int]], dtype: str, verify: bool) -> None:
        self.path = path
        check_size(path, entry)
        if verify:
            actual = sha256_file(path)
            if actual != entry["sha256"]:
                raise CacheError(f"{path}: cache shard checksum {actual[:12]}… does not match the manifest "
                                 f"({entry['sha256'][:12]}…): corrupt; rebuild with --rebuild-cache")
        rows = entry["stop"] - entry["start"]
        _, np_dtype, tag = DTYPES[dtype]
        with open(path, "rb") as fh:
            self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            header, data_start = self._header()
            self.arrays: dict[str, np.ndarray] = {}
            for name, shape in tensors.items():
                info = header.get(name)
                want = [rows, *shape]
                if not isinstance(info, dict) or info.get("dtype") != tag or info.get("shape") != want:
                    raise CacheError(f"{path}: tensor {name!r} is {info and (info.get('dtype'), info.get('shape'))}, "
                                     f"manifest expects ({tag}, {want}); rebuild with --rebuild-cache")
                offsets = info.get("data_offsets")
                if not isinstance(offsets, list) or len(offsets) != 2 or not all(
                        isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets):
                    raise CacheError(f"{path}: tensor {name!r} has data_offsets {offsets!r}, expected [begin, end]; "
                                     "rebuild with --rebuild-cache")
                begin, end = offsets
                count = int(np.prod(want))
                if end - begin != count * np_dtype.itemsize or data_start + end > len(self._map):
                    raise CacheError(f"{path}: tensor {name!r} has a bad data range; rebuild with --rebuild-cache")
                self.arrays[name] = np.frombuffer(self._map, dtype=np_dtype, count=count,
                                                  offset=data_start + begin).reshape(want)
        except BaseException:
            self.close()
            raise

    def _header(self) -> tuple[dict[str, Any], int]:
        if len(self._map) < 8:
            raise CacheError(f"{self.path}: not a safetensors file")
        (length,) = struct.unpack("<Q", self._map[:8])
        if length > len(self._map) - 8:
            raise CacheError(f"{self.path}: safetensors header runs past the end of the file")
        try:
            header = json.loads(self._map[8 : 8 + length])
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CacheError(f"{self.path}: safetensors header is not valid JSON") from None
        if not isinstance(header, dict):
            raise CacheError(f"{self.path}: safetensors header is {type(header).__name__}, expected an object")
        return header, 8 + length

    def close(self) -> None:
        self.arrays = {}
        try:
            self._map.close()
        except BufferError:  # a view is still referenced somewhere; the map closes when it is collected
            pass


class CacheReader:
    """Row gathers from a complete cache; keeps at most `max_views` views mapped.

    Training reads one view per epoch, so unmapping the others keeps the process's
    resident file pages to one view, however many views the cache holds. Each shard's
    checksum is verified the first time the process maps it (`verify=True`).
    """

    def __init__(self, cache_dir: str | Path, manifest: dict[str, Any], verify: bool = True, max_views: int = 1) -> None:
        self.dir = Path(cache_dir)
        spec = CacheSpec.from_dict(manifest, self.dir / MANIFEST_NAME)  # callers may hand in a manifest built in memory
        self.manifest = spec.to_dict()
        self.verify = verify
        self.max_views = max_views
        self.num_samples = spec.layout.num_samples
        self.views = spec.layout.views
        self.per_shard = spec.layout.samples_per_shard
        self.dtype = spec.dtype
        self.tensors: dict[str, list[int]] = spec.tensors
        self._verified: set[str] = set()
        self._open: OrderedDict[int, list[ShardFile]] = OrderedDict()
        self._lock = threading.Lock()
        for plan in plan_shards(self.num_samples, self.views, self.per_shard):
            entry = self.manifest["shards"].get(plan["name"])
            if entry is None:
                raise CacheError(f"{self.dir}: cache shard {plan['name']} was never completed; "
                                 "run `python -m rrd_fast.cache build` to finish it")
            if (entry["view"], entry["start"], entry["stop"]) != (plan["view"], plan["start"], plan["stop"]):
                raise CacheError(f"{self.dir / MANIFEST_NAME}: shard {plan['name']} records view {entry['view']} rows "
                                 f"{entry['start']}..{entry['stop']}, the layout plans view {plan['view']} rows "
                                 f"{plan['start']}..{plan['stop']}; rebuild with --rebuild-cache")
            check_size(self.dir / plan["name"], entry)

    def _view(self, view: int) -> list[ShardFile]:
        if view in self._open:
            self._open.move_to_end(view)
            return self._open[view]
        if not 0 <= view < self.views:
            raise CacheError(f"{self.dir}: augmentation view {view} is outside the cache's {self.views} views")
        shards = []
        try:
            for start in range(0, self.num_samples, self.per_shard):
                name = shard_name(view, start)
                shard = ShardFile(self.dir / name, self.manifest["shards"][name], self.tensors, self.dtype,
                                  verify=self.verify and name not in self._verified)
                self._verified.add(name)
                shards.append(shard)
        except BaseException:
            for shard in shards:
                shard.close()
            raise
        self._open[view] = shards
        while len(self._open) > self.max_views:
            for shard in self._open.popitem(last=False)[1]:
                shard.close()
        return shards

    def gather(self, view: int, index: np.ndarray) -> dict[str, np.ndarray]:
        """Copies of the stored rows for these sample indices of this view."""
        index = np.asarray(index, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= self.num_samples):
            raise CacheError(f"{self.dir}: sample index outside the cache's {self.num_samples} samples")
        with self._lock:
            shards = self._view(view)
            if len(shards) == 1:
                return {name: np.take(arr, index, axis=0) for name, arr in shards[0].arrays.items()}
            which, local = np.divmod(index, self.per_shard)
            out = {name: np.empty((len(index), *shape), dtype=DTYPES[self.dtype][1]) for name, shape in self.tensors.items()}
            for s in np.unique(which):
                rows = which == s
                for name, arr in shards[s].arrays.items():
                    out[name][rows] = np.take(arr, local[rows], axis=0)
            return out

    def close(self) -> None:
        with self._lock:
            while self._open:
                for shard in self._open.popitem()[1]:
                    shard.close()


def as_tensor(array: np.ndarray, dtype: str) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if dtype == "bf16" else tensor


def clear_stale(cache_dir: Path, keep: set[str]) -> None:
    """Remove leftovers of a killed build: temporary files and shards the manifest never recorded."""
    for path in cache_dir.glob(".view-*.tmp"):
        path.unlink(missing_ok=True)
    for path in cache_dir.glob(".manifest.json.*.tmp"):
        path.unlink(missing_ok=True)
    for path in cache_dir.glob("view-*.safetensors"):
        if path.name not in keep:
            os.unlink(path)
