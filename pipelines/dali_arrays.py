"""DALI pipeline for in-memory splits (CIFAR-10/100, Fashion-MNIST, STL-10 after reading).

The split is zero-padded once and stays where the trainer runs: a numpy array on CPU
machines, one uint8 tensor on the GPU otherwise. Each batch is gathered by sample index,
and the crop offsets and flips from `CropFlipSpec.params(seed, epoch, index)` are fed in as
per-sample inputs. One fused `fn.crop_mirror_normalize` then crops the padded image (offset
o becomes the relative position o / 2·pad, which DALI rounds back to exactly o), mirrors
and normalises to float NCHW. The output is therefore a pure function of (seed, epoch,
index) and equals `ArrayPipeline`'s up to float rounding of the normalisation.

Lanes: for 32×32 images DALI's per-sample bookkeeping (each per-sample argument costs
about as much as the pixel work) dominates, and a second worker thread in one pipeline
barely helps. So on CPU the pipeline runs several independent DALI pipelines ("lanes",
see `default_lanes`) and deals whole batches to them in turn: batch i goes to lane
i mod lanes, and batches come back in order. Every batch is still the same pure function
of (seed, epoch, index), whatever the number of lanes.

Sequence layout (`sequence=True`): the whole batch is one DALI sample, a sequence of B
frames, and `fn.warp_affine` applies one integer translation (the crop), mirrored or not,
per frame (`fn.per_frame` matrices, nearest-neighbour, so pixels are copied exactly), then
`fn.crop_mirror_normalize` normalises all frames. DALI's per-sample cost is then paid once
per batch instead of once per image. On the CPU the per-image work of warp_affine costs
about what it saves (`rrd_fast.bench pipelines --dali-sequence` measures it slightly slower than
the default), so it is not the default; on a GPU, where the pixel work is cheap and
per-sample bookkeeping is what is left, the same flag measures it beside the default.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.augment import CropFlipSpec
from pipelines.base import BasePipeline
from pipelines.batch import Batch
from pipelines.dali_common import (DaliRunner, Source, Work, dali_images, default_lanes, default_threads, import_dali,
                                   output_dtype, round_robin)
from pipelines.sampler import EpochSampler


class DaliArrayPipeline(BasePipeline):
    """Yields `Batch`es of one in-memory split through DALI, augmented (train) or only normalised (eval)."""

    augment_type = CropFlipSpec

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        sampler: EpochSampler,
        mean: Sequence[float],
        std: Sequence[float],
        augment: CropFlipSpec | None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        num_threads: int | None = None,
        prefetch: int = 2,
        lanes: int | None = None,
        sequence: bool = False,
    ) -> None:
        """`lanes` DALI pipelines with `num_threads` workers each (defaults: `default_lanes`);
        `sequence`: one DALI sample per batch (module docstring)."""
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 N×H×W×C, got {images.dtype} {images.shape}")
        self.dali = import_dali()
        super().__init__(labels, sampler, augment, device, dtype)
        self._out_type = output_dtype(dtype)
        n, h, w, c = images.shape
        self.height, self.width, self.channels = h, w, c
        self.pad = augment.pad if augment is not None else 0
        self.sequence = sequence
        self._on_gpu = self.device.type == "cuda"
        self._images: Any = self._padded(images)
        self._mean = [255.0 * m for m in mean]
        self._std = [255.0 * s for s in std]
        self.lanes = lanes or default_lanes(self.device)
        self.threads_per_lane = num_threads or max(1, default_threads(self.device) // self.lanes)
        self._runners = [self._make_runner(prefetch) for _ in range(self.lanes)]
        self._single: DaliRunner | None = None  # for batch_for, so it never disturbs a running epoch

    def _padded(self, images: np.ndarray) -> Any:
        """The split with `pad` zero rows and columns on every side, on the pipeline's device."""
        p = self.pad
        if self._on_gpu:
            on_device = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
            return F.pad(on_device, (0, 0, p, p, p, p)) if p else on_device
        if not p:
            return np.ascontiguousarray(images)
        return np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))

    # ------------------------------------------------------------------ graph
    def _sources(self) -> list[Source]:
        types = self.dali.types
        device = "gpu" if self._on_gpu else "cpu"
        if self.sequence:
            src = [Source(types.UINT8, 4, "FHWC", device)]
            return src + [Source(types.FLOAT, 3, "F**")] if self.augment is not None else src  # per-frame matrices
        src = [Source(types.UINT8, 3, "HWC", device)]
        if self.augment is not None:
            src += [Source(types.INT32, 0)]  # mirror
            if self.pad:
                src += [Source(types.FLOAT, 0), Source(types.FLOAT, 0)]  # relative crop position y, x
        return src

    def _define(self, nodes: list[Any]) -> list[Any]:
        fn = self.dali.fn
        if self.sequence:
            frames = nodes[0]
            if self.augment is not None:
                frames = fn.warp_affine(frames, matrix=fn.per_frame(nodes[1]), size=(self.height, self.width),
                                        interp_type=self.dali.types.INTERP_NN, fill_value=0)
            return [fn.crop_mirror_normalize(frames, mean=self._mean, std=self._std, dtype=self._out_type,
                                             output_layout="FCHW")]
        crop: dict[str, Any] = {}
        if self.augment is not None:
            crop["mirror"] = nodes[1]
            if self.pad:
                crop.update(crop=(self.height, self.width), crop_pos_y=nodes[2], crop_pos_x=nodes[3])
        out = fn.crop_mirror_normalize(nodes[0], mean=self._mean, std=self._std, dtype=self._out_type,
                                       output_layout="CHW", **crop)
        return [out]

    def _inputs(self, work: Work) -> tuple[Any, ...]:
        if self._on_gpu:
            idx = torch.from_numpy(work.index).to(self.device)
            images: Any = self._images.index_select(0, idx)
        else:
            images = self._images[work.index]
        if self.sequence:
            frames = images[None]  # the batch as one sample: a sequence of B frames
            return (frames,) if self.augment is None else (frames, self._frame_matrices(work.aug)[None])
        if self.augment is None:
            return (images,)
        mirror = np.ascontiguousarray(work.aug[:, 2], dtype=np.int32)
        if not self.pad:
            return images, mirror
        # Offset o in [0, 2·pad] as a relative position; DALI rounds o / 2·pad · 2·pad back to o.
        position = work.aug[:, :2].astype(np.float32) / np.float32(2 * self.pad)
        return images, mirror, np.ascontiguousarray(position[:, 0]), np.ascontiguousarray(position[:, 1])

    def _frame_matrices(self, aug: np.ndarray) -> np.ndarray:
        """B×2×3 destination-to-source maps: pixel (y, x) of the crop reads (y + dy, x + dx) of the
        padded image, or (y + dy, W - 1 - x + dx) when flipped (pixel centres at +0.5)."""
        dy, dx, flip = (aug[:, k].astype(np.float32) for k in range(3))
        m = np.zeros((len(aug), 2, 3), dtype=np.float32)
        m[:, 0, 0] = 1.0 - 2.0 * flip
        m[:, 0, 2] = dx + flip * self.width
        m[:, 1, 1] = 1.0
        m[:, 1, 2] = dy
        return m

    def _make_runner(self, prefetch: int, batch_size: int | None = None) -> DaliRunner:
        per_run = 1 if self.sequence else batch_size or self.sampler.batch_size
        return DaliRunner(self._sources(), self._define, self._inputs, per_run, self.device,
                          num_threads=self.threads_per_lane, prefetch=prefetch)

    # ------------------------------------------------------------------ interface
    def _work(self, index: np.ndarray, epoch: int) -> Work:
        index = np.asarray(index, dtype=np.int64)
        return Work(index=index, epoch=epoch, aug=self.aug_params(index, epoch))

    def _from_dali(self, work: Work, outputs: list[Any]) -> Batch:
        images = dali_images(outputs, self.device, self.dtype)
        if self.sequence:  # one sample of B frames: 1×B×C×H×W
            images = images.flatten(0, 1)
        return self._batch(images, work.index, work.aug, work.epoch)

    def _batches(self, plan: list[np.ndarray], epoch: int) -> Iterator[Batch]:
        """The plan dealt to the lanes in turn (`round_robin`), its batches back in plan order."""
        plan = [np.asarray(index, dtype=np.int64) for index in plan]
        if not plan:
            return
        # One vectorised hash for the whole epoch instead of one small one per batch.
        params = self.aug_params(np.concatenate(plan), epoch)
        rows = np.split(params, np.cumsum([len(index) for index in plan])[:-1])
        works = [Work(index=index, epoch=epoch, aug=own) for index, own in zip(plan, rows)]
        for work, outputs in round_robin(self._runners, works):
            yield self._from_dali(work, outputs)

    def batch_for(self, index: np.ndarray, epoch: int) -> Batch:
        """Regenerate the exact batch for these sample indices at this augmentation epoch."""
        if self._single is None or (not self.sequence and self._single.batch_size < len(index)):
            self._single = self._make_runner(prefetch=1, batch_size=max(len(index), self.sampler.batch_size))
        ((work, outputs),) = list(self._single.run([self._work(index, epoch)]))
        return self._from_dali(work, outputs)
