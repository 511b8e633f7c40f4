"""Build (or resume building) a teacher cache: the frozen teacher over V views of every sample.

Shards are built view-major. Each is written atomically and only then recorded, with
its size and sha256, in the manifest (itself written atomically); a build killed at
any point therefore leaves only complete, recorded shards plus leftovers that the next
build deletes before it continues with the first unrecorded shard.
"""

from __future__ import annotations

import copy
import contextlib
import fcntl
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import rrd_fast
from pipelines.backends import Pipeline
from rrd_fast.cache.manifest import (
    CacheError,
    check_compatible,
    read_manifest,
    required_fields,
    resolved_precision,
    run_key,
    write_manifest,
)
from rrd_fast.cache.shards import DTYPES, FaultHook, check_size, clear_stale, plan_shards, write_shard
from rrd_fast.compile import Compiler, resolve_compile
from rrd_fast.config import ConfigError, RunConfig
from rrd_fast.data import IMAGE_DTYPES, build_data
from rrd_fast.models import ModelOutput, feat_shapes
from rrd_fast.checkpoint import load_teacher

# On a CPU the teacher's forward runs faster at 64 images than at 256 (smaller activations stay in the
# caches; `teacher.cache_batch_size` overrides); on CUDA the largest batch that fits.
CPU_BATCH = 64
CUDA_FIRST_BATCH = 4096
LOCK_NAME = ".build.lock"


def output_tensors(out: ModelOutput, fields: tuple[str, ...] | list[str]) -> dict[str, torch.Tensor]:
    """Named tensors of the requested ModelOutput fields; list fields become `name.i`."""
    named: dict[str, torch.Tensor] = {}
    for name in fields:
        value = getattr(out, name)
        if isinstance(value, (list, tuple)):
            named.update({f"{name}.{i}": v for i, v in enumerate(value)})
        else:
            named[name] = value
    return named


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


class _TeacherRunner:
    """The frozen teacher on the build device; shrinks its batch on CUDA out-of-memory."""

    def __init__(self, model: nn.Module, pipeline: Pipeline, device: torch.device, precision: str,
                 channels_last: bool, batch_size: int, fields: tuple[str, ...], compiler: Compiler) -> None:
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = copy.deepcopy(model).to(device, memory_format=self.memory_format).eval().requires_grad_(False)
        self.forward = compiler.function(self.model)
        self.pipeline = pipeline
        self.device = device
        self.precision = precision
        self.batch_size = batch_size
        self.fields = fields

    def run(self, index: np.ndarray, view: int) -> dict[str, torch.Tensor]:
        batch = self.pipeline.batch_for(index, view)
        images = batch.images.contiguous(memory_format=self.memory_format)
        with torch.inference_mode(), _autocast(self.device, self.precision):
            return output_tensors(self.forward(images, features=True), self.fields)

    def rows(self, view: int, start: int, stop: int, store: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        """Fill `store[name][0 : stop-start]` with the teacher's outputs for rows [start, stop) of `view`.

        Every forward pass has exactly `batch_size` samples (the last is padded by
        repeating a row), because CPU kernels pick different reduction orders for
        small batches and the cache must equal the online teacher bit for bit.
        """
        pos = start
        while pos < stop:
            size = self.batch_size
            real = min(size, stop - pos)
            index = np.minimum(np.arange(pos, pos + size, dtype=np.int64), stop - 1)
            try:
                outs = self.run(index, view)
            except torch.cuda.OutOfMemoryError:
                if self.device.type != "cuda" or size == 1:
                    raise
                self.batch_size = size // 2
                torch.cuda.empty_cache()
                continue
            for name, value in outs.items():
                rows = value[:real].to(dtype)
                if dtype == torch.float16 and not bool(torch.isfinite(rows).all()) and bool(torch.isfinite(value[:real]).all()):
                    raise CacheError(f"teacher cache: teacher output {name!r} reaches {float(value.abs().max()):.4g}, "
                                     "beyond fp16's range (65504); use teacher.cache_dtype=bf16 or fp32")
                store[name][pos - start : pos - start + real] = rows
            pos += real


@contextlib.contextmanager
def _build_lock(cache_dir: Path) -> Any:
    """One builder per cache folder; the kernel drops the lock when its holder dies.

    The lock file goes when the build ends (removed while still locked). A process that
    opened it just before that removal would lock a file no longer in the folder, so each
    process checks, once it holds the lock, that the path still names the file it locked,
    and starts over on the new one if not. A killed builder leaves the file, unlocked: the
    next build takes it over and removes it.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CacheError(f"{cache_dir}: another process is building this teacher cache") from None
        try:
            held, named = os.fstat(fd), os.stat(path)
            if (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # removed by the builder that just finished: lock the current file instead
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)


def _check_disk(cache_dir: Path, needed: int) -> None:
    free = shutil.disk_usage(cache_dir).free
    if needed > free:
        raise CacheError(f"{cache_dir}: the cache needs {needed / 2**30:.2f} GiB more, only {free / 2**30:.2f} GiB free")


class CacheTooLarge(CacheError):
    """The declared teacher fields would not fit teacher.cache_max_gb."""


def estimate_cache_bytes(teacher: nn.Module, fields: tuple[str, ...], in_channels: int, image_size: int,
                         num_samples: int, views: int, dtype: str) -> tuple[int, dict[str, int]]:
    """(total bytes, bytes per sample and view of each field) of a cache holding `fields`."""
    shapes = feat_shapes(teacher, in_channels, image_size)
    per_field = {"logits": int(teacher(torch.zeros(1, in_channels, image_size, image_size)).shape[1]) if "logits" in fields else 0,
                 "pooled": int(np.prod(shapes[-1])), "stem": int(np.prod(shapes[0])),
                 "stages": sum(int(np.prod(s)) for s in shapes[1:-1])}
    per_field["pre_relu"] = per_field["stages"]
    itemsize = DTYPES[dtype][0].itemsize
    row = {f: per_field[f] * itemsize for f in fields}
    return sum(row.values()) * num_samples * views, row


def check_cache_size(cfg: RunConfig, teacher: nn.Module, fields: tuple[str, ...], num_samples: int,
                     log: Callable[[str], None]) -> None:
    """Say what the cache will cost before building it, and refuse one larger than teacher.cache_max_gb."""
    from pipelines.formats import get_format

    fmt = get_format(cfg.data.format)
    was_training = teacher.training
    with torch.no_grad():
        total, row = estimate_cache_bytes(teacher.eval(), fields, fmt.channels, fmt.image_size, num_samples,
                                          cfg.teacher.cache_views, cfg.teacher.cache_dtype)
    teacher.train(was_training)
    per_view = total / cfg.teacher.cache_views
    parts = ", ".join(f"{f} {b / 1024:.1f} KiB" for f, b in row.items())
    log(f"teacher cache: {num_samples} samples x {cfg.teacher.cache_views} views of [{parts}] per sample in "
        f"{cfg.teacher.cache_dtype}: {per_view / 2**30:.2f} GiB per view, {total / 2**30:.2f} GiB in all")
    if total > cfg.teacher.cache_max_gb * 2**30:
        raise CacheTooLarge(f"teacher.cache: the fields {list(fields)} need {total / 2**30:.1f} GiB for "
                            f"{cfg.teacher.cache_views} views ({per_view / 2**30:.2f} GiB per view), more than "
                            f"teacher.cache_max_gb={cfg.teacher.cache_max_gb:g}; raise it, lower teacher.cache_views, "
                            "or set teacher.cache_fallback=online to run the teacher online")


def _default_batch(cfg: RunConfig, device: torch.device) -> int:
    if cfg.teacher.cache_batch_size > 0:
        return cfg.teacher.cache_batch_size
    return CUDA_FIRST_BATCH if device.type == "cuda" else CPU_BATCH


def build_cache(
    cfg: RunConfig,
    *,
    rebuild: bool = False,
    teacher: nn.Module | None = None,
    teacher_meta: dict[str, Any] | None = None,
    pipeline: Pipeline | None = None,
    device: str | torch.device | None = None,
    key: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
    fault: FaultHook | None = None,
    compiler: Compiler | None = None,
) -> dict[str, Any]:
    """Make `cfg.teacher.cache` a complete cache for this run and return its manifest.

    A complete matching cache is returned untouched (nothing is moved to the device);
    a matching incomplete one is resumed; one built for another run is refused unless
    `rebuild`. `teacher` (CPU, as load_teacher returns it) and `pipeline` default to
    the config's. `fault(phase, shard_index)` is a test hook, called at
    "tmp_written" (shard file written, not yet renamed), "renamed" (not yet recorded)
    and "recorded"; tests raise or kill the process there to interrupt a build.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if not cfg.teacher.cache:
        raise ConfigError("teacher.cache: no cache folder set")
    if cfg.teacher.cache_views <= 0:
        raise ConfigError(f"teacher.cache_views: must be positive, got {cfg.teacher.cache_views}")
    if cfg.teacher.cache_shard_samples <= 0:
        raise ConfigError(f"teacher.cache_shard_samples: must be positive, got {cfg.teacher.cache_shard_samples}")
    cache_dir = Path(cfg.teacher.cache)
    if cache_dir.exists() and not cache_dir.is_dir():
        raise CacheError(f"{cache_dir}: teacher.cache is a file, not a folder")
    if teacher is None or teacher_meta is None:
        from pipelines.formats import get_format, read_split

        fmt = get_format(cfg.data.format)
        num_classes = read_split(fmt.name, cfg.data.root, fmt.train_split).num_classes  # the data's, not the format's
        teacher, teacher_meta = load_teacher(cfg.teacher.checkpoint, cfg.teacher.arch, num_classes, fmt.channels)
    key = key or run_key(cfg, teacher_meta)
    fields = required_fields(cfg)
    manifest = None if rebuild else read_manifest(cache_dir)
    if manifest is not None:
        check_compatible(cache_dir, manifest, key, fields)
        if manifest["complete"]:
            return manifest
    check_cache_size(cfg, teacher, fields, int(key["dataset"]["num_samples"]), log)
    with _build_lock(cache_dir):
        return _build_locked(cfg, cache_dir, rebuild, teacher, teacher_meta, pipeline, device, key, fields, log, fault,
                             compiler)


def _build_locked(cfg: RunConfig, cache_dir: Path, rebuild: bool, teacher: nn.Module, teacher_meta: dict[str, Any],
                  pipeline: Pipeline | None, device: str | torch.device | None, key: dict[str, Any],
                  fields: tuple[str, ...], log: Callable[[str], None], fault: FaultHook | None,
                  compiler: Compiler | None) -> dict[str, Any]:
    manifest = None if rebuild else read_manifest(cache_dir)  # again, now that no other builder can write it
    if manifest is not None:
        check_compatible(cache_dir, manifest, key, fields)
        if manifest["complete"]:
            return manifest
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = resolved_precision(cfg)
    # The run's pipeline serves unless its batches were rounded to a type this build's autocast
    # does not round to (bf16 batches for an fp32 or fp16 teacher, say): fp32 batches always serve.
    if pipeline is None or pipeline.dtype not in (torch.float32, IMAGE_DTYPES[precision]):
        pipeline = build_data(cfg.data, cfg.seed, 0, 1, device, precision).train
    num_samples = int(key["dataset"]["num_samples"])
    if pipeline.sampler.n != num_samples:
        raise CacheError(f"{cache_dir}: the train pipeline has {pipeline.sampler.n} samples, "
                         f"the dataset fingerprint {num_samples}")
    store_dtype = DTYPES[cfg.teacher.cache_dtype][0]
    batch = _default_batch(cfg, device)
    if compiler is None:  # the CLI build: decide as a run would, from the number of teacher batches
        passes = cfg.teacher.cache_views * -(-num_samples // batch)
        compiler = Compiler(resolve_compile(cfg.train.compile, passes, device)[0], cfg.train.compile_backend,
                            cfg.train.compile_mode, device)
    runner = _TeacherRunner(teacher, pipeline, device, precision, cfg.train.channels_last, batch, fields, compiler)
    if manifest is None:
        probe = runner.run(np.array([0, min(1, num_samples - 1)]), 0)
        per_shard = min(cfg.teacher.cache_shard_samples, num_samples)
        manifest = {
            "key": key,
            "fields": list(fields),
            "tensors": {name: list(value.shape[1:]) for name, value in probe.items()},
            "layout": {"num_samples": num_samples, "views": cfg.teacher.cache_views, "samples_per_shard": per_shard},
            "teacher_info": {"pooled_dim": int(getattr(teacher, "pooled_dim", probe["pooled"].shape[1])),
                             "stage_channels": [int(c) for c in getattr(teacher, "stage_channels", [])]},
            "info": {"tool_version": rrd_fast.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                     "device": str(device), "channels_last": cfg.train.channels_last,
                     "pipeline": type(pipeline).__name__, "build_seconds": 0.0},
            "shards": {},
            "complete": False,
        }
        write_manifest(cache_dir, manifest)  # first: an old manifest must never describe the shards removed next
        clear_stale(cache_dir, keep=set())
    else:
        log(f"{cache_dir}: resuming an interrupted build ({len(manifest['shards'])} shards already complete)")
        for name, entry in list(manifest["shards"].items()):
            try:
                check_size(cache_dir / name, entry)
            except CacheError:
                del manifest["shards"][name]
        clear_stale(cache_dir, keep=set(manifest["shards"]))
    layout = manifest["layout"]
    runner.batch_size = min(runner.batch_size, layout["samples_per_shard"])
    plan = plan_shards(num_samples, layout["views"], layout["samples_per_shard"])
    todo = [(i, p) for i, p in enumerate(plan) if p["name"] not in manifest["shards"]]
    total_rows = sum(p["stop"] - p["start"] for _, p in todo)
    row_bytes = sum(int(np.prod(shape)) for shape in manifest["tensors"].values()) * store_dtype.itemsize
    _check_disk(cache_dir, total_rows * row_bytes)
    bar = tqdm(total=total_rows, desc=f"teacher cache {cache_dir.name}", unit="img", dynamic_ncols=True,
               disable=not cfg.train.progress, leave=False)
    began = time.perf_counter()
    for i, part in todo:
        t0 = time.perf_counter()
        rows = part["stop"] - part["start"]
        store = {name: torch.empty((rows, *shape), dtype=store_dtype, device=device)
                 for name, shape in manifest["tensors"].items()}
        runner.rows(part["view"], part["start"], part["stop"], store, store_dtype)
        entry = write_shard(cache_dir / part["name"], store, i, fault)
        if fault is not None:
            fault("renamed", i)
        manifest["shards"][part["name"]] = {"view": part["view"], "start": part["start"], "stop": part["stop"], **entry}
        manifest["info"]["build_seconds"] += time.perf_counter() - t0
        manifest["info"]["build_batch_size"] = runner.batch_size
        write_manifest(cache_dir, manifest)
        if fault is not None:
            fault("recorded", i)
        bar.update(rows)
    bar.close()
    manifest["complete"] = True
    write_manifest(cache_dir, manifest)
    if todo:
        elapsed = time.perf_counter() - began
        size = sum(e["bytes"] for e in manifest["shards"].values())
        log(f"{cache_dir}: built {len(todo)} shards, {total_rows} teacher passes in {elapsed:.1f} s "
            f"({total_rows / max(elapsed, 1e-9):.0f} img/s); cache {size / 2**20:.1f} MiB, "
            f"{size / layout['views'] / 2**20:.2f} MiB per view")
    return manifest
