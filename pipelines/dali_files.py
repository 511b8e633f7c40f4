"""DALI pipeline for datasets of encoded images (Tiny-ImageNet-200, ImageNet folders).

Order and sharding: the sample order of every rank comes from `EpochSampler`, the same
object the torch backend uses, and the encoded bytes of each planned batch are read by a
small thread pool and fed to DALI through `fn.external_source`. We do not use
`fn.readers.file` with `shard_id`/`num_shards`: its shards are contiguous slices of the file
list shuffled through a reservoir buffer by DALI's own RNG, and `pad_last_batch` repeats
samples, so neither the visiting order nor the crop box of a sample could be a function of
(seed, epoch, index), and the two backends could not see the same epoch. Feeding the bytes
keeps one source of truth for exact epoch semantics under sharding, and the sample indices
come back with every batch.

DALI then decodes (`fn.decoders.image`, `device="mixed"`: nvJPEG on a GPU, libjpeg-turbo
on CPU), applies the random-resized crop as a relative ROI of `fn.resize` (the box from
`ResizedCropSpec.params`), mirrors and normalises (`fn.crop_mirror_normalize`). Evaluation
resizes the shorter side (`resize_shorter`) and takes the centre crop.

Corrupt files: obvious non-images are caught by a signature check when read; anything the
decoder still rejects makes DALI fail the batch, after which the batches in flight are
decoded one file at a time to find the culprit. Policy `error` raises a DataError naming
the file; policy `skip` drops it with a warning, counts it, and re-runs the batch.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from pipelines.augment import ResizedCropSpec
from pipelines.base import FileSplitPipeline
from pipelines.batch import Batch
from pipelines.dali_common import DaliRunner, Source, Work, dali_images, first_error_line, import_dali, output_dtype
from pipelines.errors import DataError
from pipelines.sampler import EpochSampler
from pipelines.views import CenterCropSpec, looks_like_image


def _pillow_reason(path: Path) -> str | None:
    """Why Pillow cannot decode `path` (a readable reason for the error message), or None."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            im.load()
    except Exception as exc:  # any failure is the reason we want to show
        return str(exc) or type(exc).__name__
    return None


class DaliFilePipeline(FileSplitPipeline):
    """Yields `Batch`es of a `FileSplit` decoded and augmented by DALI."""

    def __init__(
        self,
        paths: Sequence[Path],
        labels: np.ndarray,
        sampler: EpochSampler,
        mean: Sequence[float],
        std: Sequence[float],
        augment: ResizedCropSpec | None,
        size: int,
        center: CenterCropSpec,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        num_threads: int | None = None,
        prefetch: int = 2,
        on_corrupt: str = "error",
        readers: int = 2,
    ) -> None:
        super().__init__(paths, labels, sampler, augment, size, center, device, dtype, on_corrupt)
        self.dali = import_dali()
        self._out_type = output_dtype(dtype)
        self._on_gpu = self.device.type == "cuda"
        self._mean = [255.0 * m for m in mean]
        self._std = [255.0 * s for s in std]
        self._num_threads, self._prefetch = num_threads, prefetch
        self._readers = max(1, readers)
        self._read_pool: ThreadPoolExecutor | None = None
        self._runner = self._make_runner(prefetch)
        self._single: DaliRunner | None = None
        self._checker: DaliRunner | None = None

    # ------------------------------------------------------------------ graph
    def _sources(self) -> list[Source]:
        types = self.dali.types
        src = [Source(types.UINT8, 1)]
        if self.augment is not None:
            src += [Source(types.FLOAT, 1), Source(types.FLOAT, 1), Source(types.INT32, 0)]
        return src

    def _decode(self, encoded: Any) -> Any:
        return self.dali.fn.decoders.image(encoded, device="mixed" if self._on_gpu else "cpu",
                                           output_type=self.dali.types.RGB)

    def _define(self, nodes: list[Any]) -> list[Any]:
        fn, types = self.dali.fn, self.dali.types
        images = self._decode(nodes[0])
        norm = dict(mean=self._mean, std=self._std, dtype=self._out_type, output_layout="CHW")
        if self.augment is not None:
            roi_start, roi_end, mirror = nodes[1], nodes[2], nodes[3]
            images = fn.resize(images, size=[self.size, self.size], roi_start=roi_start, roi_end=roi_end,
                               roi_relative=True, interp_type=types.INTERP_LINEAR, antialias=True)
            out = fn.crop_mirror_normalize(images, mirror=mirror, **norm)
        else:
            images = fn.resize(images, resize_shorter=self.center.resize, interp_type=types.INTERP_LINEAR, antialias=True)
            out = fn.crop_mirror_normalize(images, crop=(self.center.size, self.center.size), **norm)
        return [out]

    def _inputs(self, work: Work) -> tuple[Any, ...]:
        encoded = work.extra["encoded"]
        if self.augment is None:
            return (encoded,)
        aug = work.aug
        start = np.ascontiguousarray(aug[:, 0:2], dtype=np.float32)  # (y0, x0): shape order of HWC
        end = np.ascontiguousarray(aug[:, 0:2] + aug[:, 2:4], dtype=np.float32)
        mirror = np.ascontiguousarray(aug[:, 4] >= 0.5, dtype=np.int32)
        return encoded, start, end, mirror

    def _make_runner(self, prefetch: int, batch_size: int | None = None) -> DaliRunner:
        return DaliRunner(self._sources(), self._define, self._inputs, batch_size or self.sampler.batch_size,
                          self.device, num_threads=self._num_threads, prefetch=prefetch, on_error=self._on_error)

    # ------------------------------------------------------------------ reading
    def _read(self, index: np.ndarray) -> tuple[list[int], list[np.ndarray]]:
        """Encoded bytes of each sample, dropping known-bad and obviously corrupt files (policy permitting)."""
        keep: list[int] = []
        encoded: list[np.ndarray] = []
        for k, i in enumerate(index.tolist()):
            if self.corrupt.is_skipped(i):
                continue
            path = self.paths[i]
            try:
                with open(path, "rb") as fh:  # cheaper per file than np.fromfile
                    raw = fh.read()
            except OSError as exc:
                raise DataError(f"{path}: cannot read image file ({exc.strerror or type(exc).__name__})") from None
            data = np.frombuffer(raw, dtype=np.uint8)
            if not looks_like_image(raw):
                reason = "empty file" if data.size == 0 else "not a JPEG or PNG file"
                self.corrupt.handle(i, path, reason)
                continue
            keep.append(k)
            encoded.append(data)
        return keep, encoded

    def _submit(self, index: np.ndarray, epoch: int) -> tuple[Work, Future]:
        if self._read_pool is None:
            self._read_pool = ThreadPoolExecutor(self._readers, thread_name_prefix="dali-read")
        index = np.asarray(index, dtype=np.int64)
        work = Work(index=index, epoch=epoch, aug=self.aug_params(index, epoch))
        return work, self._read_pool.submit(self._read, index)

    @staticmethod
    def _ready(work: Work, future: Future) -> Work | None:
        keep, encoded = future.result()
        if len(keep) < len(work.index):
            work.index, work.aug = work.index[keep], work.aug[keep]
        work.extra["encoded"] = encoded
        return work if keep else None

    def _works(self, batches: list[np.ndarray], epoch: int) -> Iterator[Work]:
        """Planned batches with their bytes read, `readers + 1` batches ahead of DALI."""
        ahead: deque = deque()
        try:
            for index in batches:
                ahead.append(self._submit(index, epoch))
                if len(ahead) > self._readers:
                    work = self._ready(*ahead.popleft())
                    if work is not None:
                        yield work
            while ahead:
                work = self._ready(*ahead.popleft())
                if work is not None:
                    yield work
        finally:
            for _, f in ahead:
                f.cancel()

    # ------------------------------------------------------------------ errors
    def _decodes(self, data: np.ndarray) -> str | None:
        """None if DALI decodes these bytes alone, else its error line."""
        if self._checker is None:
            self._checker = DaliRunner([Source(self.dali.types.UINT8, 1)], lambda nodes: [self._decode(nodes[0])],
                                       lambda work: work.inputs, 1, self.device, num_threads=1, prefetch=1)
        probe = Work(index=np.zeros(1, np.int64), epoch=0, aug=ResizedCropSpec.identity(1), inputs=([data],))
        try:
            for _ in self._checker.run([probe]):
                pass
        except Exception as exc:  # the decoder's verdict
            return first_error_line(exc)
        return None

    def _on_error(self, in_flight: list[Work], exc: BaseException) -> list[Work]:
        """Find the files DALI cannot decode among the batches in flight; raise or drop them."""
        found = False
        retry: list[Work] = []
        for work in in_flight:
            keep = []
            for k, (i, data) in enumerate(zip(work.index.tolist(), work.extra["encoded"])):
                verdict = self._decodes(data)
                if verdict is None:
                    keep.append(k)
                    continue
                found = True
                path = self.paths[i]
                self.corrupt.handle(i, path, _pillow_reason(path) or f"DALI decoder: {verdict}")
            if len(keep) < len(work.index):
                work.index, work.aug = work.index[keep], work.aug[keep]
                work.extra["encoded"] = [work.extra["encoded"][k] for k in keep]
            work.inputs = None
            if keep:
                retry.append(work)
        if not found:
            first = self.paths[int(in_flight[0].index[0])] if in_flight and len(in_flight[0].index) else "?"
            raise RuntimeError(f"DALI pipeline failed on the batch starting with {first}: {first_error_line(exc)}") from exc
        return retry

    # ------------------------------------------------------------------ interface
    def _from_dali(self, work: Work, outputs: list[Any]) -> Batch:
        return self._batch(dali_images(outputs, self.device, self.dtype), work.index, work.aug, work.epoch)

    def _empty(self, epoch: int) -> Batch:
        images = torch.zeros((0, 3, self.size, self.size), dtype=self.dtype, device=self.device)
        return self._batch(images, np.zeros(0, dtype=np.int64), ResizedCropSpec.identity(0), epoch)

    def _batches(self, plan: list[np.ndarray], epoch: int) -> Iterator[Batch]:
        """The plan's bytes read ahead and run through DALI; skipped corrupt files shrink their batch."""
        for work, outputs in self._runner.run(self._works(plan, epoch)):
            yield self._from_dali(work, outputs)

    def batch_for(self, index: np.ndarray, epoch: int) -> Batch:
        """Regenerate the exact batch for these sample indices at this augmentation epoch."""
        if self._single is None or self._single.batch_size < len(index):
            self._single = self._make_runner(prefetch=1, batch_size=max(len(index), self.sampler.batch_size))
        out = list(self._single.run(self._works([np.asarray(index, dtype=np.int64)], epoch)))
        return self._from_dali(*out[0]) if out else self._empty(epoch)

    def close(self) -> None:
        self._runner.discard()
        if self._read_pool is not None:
            self._read_pool.shutdown(wait=True, cancel_futures=True)
            self._read_pool = None

    def __del__(self) -> None:
        pool = getattr(self, "_read_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

