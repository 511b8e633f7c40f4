"""Serve the teacher's outputs from the cache during training.

`CachedTeacher.wrap(pipeline)` returns the train pipeline the trainer iterates: epoch e
keeps its own sample order but replays augmentation view e mod V, and while step k
runs, a background thread gathers the cached rows of step k+1 (indices come from the
sampler, so no device sync is needed to learn them) and pins them on CUDA. The trainer
then calls the teacher as usual, `teacher(batch, images) -> ModelOutput`, and gets the
prefetched rows copied to the device without blocking.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from pipelines.backends import Pipeline
from pipelines.batch import Batch
from rrd_fast.cache.builder import build_cache
from rrd_fast.cache.manifest import CacheError, check_compatible, read_manifest, required_fields, run_key
from rrd_fast.cache.shards import CacheReader, as_tensor
from rrd_fast.compile import Compiler
from rrd_fast.config import RunConfig
from rrd_fast.models import ModelOutput


@dataclass
class _Staged:
    batch: Batch
    view: int
    index: np.ndarray
    rows: Future


class ViewPipeline:
    """A train pipeline whose epoch e replays augmentation view e mod V, prefetching cached rows."""

    def __init__(self, inner: Pipeline, teacher: "CachedTeacher") -> None:
        self.inner = inner
        self.teacher = teacher

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name: str) -> Any:  # sampler, batch_for, ...: those of the wrapped pipeline
        if name in ("inner", "teacher"):  # not set yet (copy/pickle): no recursion through __getattr__
            raise AttributeError(name)
        return getattr(self.inner, name)

    def epoch(self, epoch: int, start_step: int = 0, aug_epoch: int | None = None) -> Iterator[Batch]:
        view = epoch % self.teacher.views if aug_epoch is None else aug_epoch
        plan = self.inner.sampler.batches(epoch)[start_step:]
        ahead = self.teacher.prefetch(view, plan[0]) if plan else None
        for step, batch in enumerate(self.inner.epoch(epoch, start_step, aug_epoch=view)):
            if step >= len(plan):
                raise CacheError(f"teacher cache: the pipeline yielded more than the sampler's {len(plan)} batches")
            current = ahead
            ahead = self.teacher.prefetch(view, plan[step + 1]) if step + 1 < len(plan) else None
            self.teacher.stage(_Staged(batch, view, plan[step], current))
            yield batch
        self.teacher.end_epoch()


class CachedTeacher:
    """Stands in for the online teacher: outputs for (batch.index, view) from the cache."""

    def __init__(self, reader: CacheReader, device: str | torch.device, fields: list[str]) -> None:
        self.reader = reader
        self.views = reader.views
        self.device = torch.device(device)
        self.fields = fields
        self.pin = self.device.type == "cuda"
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher-cache")
        self._staged: _Staged | None = None
        self._mismatch: torch.Tensor | None = None
        # A compiled step sets this: outputs then live in buffers reused by the next call (see _into_buffer).
        self.static_buffers = False
        self._buffers: dict[str, torch.Tensor] = {}
        self.wait_seconds = 0.0  # time the step spent waiting for cached rows (prefetch misses)

    def _into_buffer(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """The rows as fp32 on the device, in a buffer allocated once per field and batch shape, so that a
        compiled step (CUDA graphs included) always reads its teacher inputs from the same memory. A step's
        outputs are overwritten by the next step's, after its backward and optimizer step have run."""
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape != rows.shape:
            buffer = self._buffers[name] = torch.empty(rows.shape, dtype=torch.float32, device=self.device)
        return buffer.copy_(rows, non_blocking=True)

    def wrap(self, pipeline: Pipeline) -> ViewPipeline:
        return ViewPipeline(pipeline, self)

    # ------------------------------------------------------------ reading
    def _read(self, view: int, index: np.ndarray) -> dict[str, torch.Tensor]:
        rows = {name: as_tensor(arr, self.reader.dtype) for name, arr in self.reader.gather(view, index).items()}
        return {name: t.pin_memory() for name, t in rows.items()} if self.pin else rows

    def prefetch(self, view: int, index: np.ndarray) -> Future:
        return self._pool.submit(self._read, view, np.asarray(index))

    def stage(self, staged: _Staged) -> None:
        self._staged = staged

    def end_epoch(self) -> None:
        """One device sync per epoch: did any batch differ from the indices the prefetch read?"""
        self._staged = None
        flag, self._mismatch = self._mismatch, None
        if flag is not None and bool(flag):
            raise CacheError("teacher cache: the pipeline yielded other sample indices than its sampler planned; "
                             "cached teacher outputs would not match the batch")

    def _check_index(self, batch: Batch, expected: np.ndarray) -> None:
        if batch.index.device.type == "cpu":
            if not np.array_equal(batch.index.numpy(), expected):
                raise CacheError("teacher cache: batch indices differ from the prefetched ones")
            return
        want = torch.from_numpy(expected).to(batch.index.device, non_blocking=True)
        bad = (batch.index != want).any()
        self._mismatch = bad if self._mismatch is None else self._mismatch | bad

    # ------------------------------------------------------------ serving
    def __call__(self, batch: Batch, images: torch.Tensor) -> ModelOutput:
        staged, self._staged = self._staged, None
        if staged is not None and staged.batch is batch:
            self._check_index(batch, staged.index)
            began = time.perf_counter()
            rows = staged.rows.result()
            self.wait_seconds += time.perf_counter() - began
        else:  # a batch this wrapper did not plan: read it now, keyed by its own (index, epoch)
            if not 0 <= batch.epoch < self.views:
                raise CacheError(f"teacher cache: batch of augmentation epoch {batch.epoch} has no cached view "
                                 f"(the cache holds views 0..{self.views - 1})")
            rows = self._read(batch.epoch, batch.index.cpu().numpy())
        if self.static_buffers:
            out = {name: self._into_buffer(name, t) for name, t in rows.items()}
        else:
            out = {name: t.to(self.device, non_blocking=True).float() for name, t in rows.items()}
        lists = {f: [out[k] for k in sorted((k for k in out if k.startswith(f + ".")), key=lambda k: int(k.split(".")[1]))]
                 for f in ("stages", "pre_relu") if f in self.fields}
        return ModelOutput(logits=out["logits"], pooled=out["pooled"], stem=out.get("stem"), **lists)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.reader.close()


def open_cached_teacher(
    cfg: RunConfig,
    teacher: nn.Module,
    teacher_meta: dict[str, Any],
    pipeline: Pipeline,
    device: str | torch.device,
    needed: tuple[str, ...] = (),
    rebuild: bool = False,
    may_build: bool = True,
    dataset: dict[str, Any] | None = None,
    compiler: Compiler | None = None,
) -> CachedTeacher:
    """The cached teacher for this run, building or resuming the cache first when allowed.

    `teacher` stays where it is (CPU): only a build copies it to the device. Runs with
    several processes do not build (one process would stall the others past their
    collective timeouts); they need a cache built beforehand with the CLI. `dataset` is the
    training split's fingerprint when the caller has it (else it is computed from disk).
    """
    key = run_key(cfg, teacher_meta, dataset)
    if may_build:
        manifest = build_cache(cfg, rebuild=rebuild, teacher=teacher, teacher_meta=teacher_meta,
                               pipeline=pipeline, device=device, key=key, compiler=compiler)
    else:
        manifest = read_manifest(cfg.teacher.cache)
        if manifest is None or not manifest["complete"] or rebuild:
            raise CacheError(f"{cfg.teacher.cache}: no complete teacher cache; multi-process runs do not build one: "
                             "run `python -m rrd_fast.cache build --config CFG` (same overrides) first")
        check_compatible(cfg.teacher.cache, manifest, key, required_fields(cfg))
    missing = [f for f in needed if f not in manifest["fields"]]
    if missing:
        raise CacheError(f"{cfg.teacher.cache}: cache lacks teacher fields {missing}; rebuild with --rebuild-cache")
    reader = CacheReader(cfg.teacher.cache, manifest, verify=cfg.teacher.cache_verify == "checksum")
    return CachedTeacher(reader, device, list(manifest["fields"]))
