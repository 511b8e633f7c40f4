"""DALI pipeline for in-memory splits (CIFAR-10/100, Fashion-MNIST, STL-10 after reading).

The split stays where the trainer runs: a numpy array on CPU machines, one uint8 tensor on
the GPU otherwise. Each batch is gathered by sample index, and the crop offsets and flips
from `CropFlipSpec.params(seed, epoch, index)` are fed in as per-sample inputs. DALI then
pads and crops (`fn.slice`, zero fill outside the image), mirrors and normalises to float
NCHW (`fn.crop_mirror_normalize`). The output is therefore a pure function of
(seed, epoch, index) and equals `ArrayPipeline`'s up to float rounding of the normalisation.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch

from pipelines.augment import CropFlipSpec
from pipelines.batch import Batch
from pipelines.dali_common import DaliRunner, Source, Work, batch_from_outputs, import_dali, output_dtype
from pipelines.sampler import EpochSampler


class DaliArrayPipeline:
    """Yields `Batch`es of one in-memory split through DALI, augmented (train) or only normalised (eval)."""

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
    ) -> None:
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 N×H×W×C, got {images.dtype} {images.shape}")
        self.dali = import_dali()
        self.sampler = sampler
        self.augment = augment
        self.device = torch.device(device)
        self.dtype = dtype
        self._out_type = output_dtype(dtype)
        n, h, w, c = images.shape
        self.height, self.width, self.channels = h, w, c
        self.pad = augment.pad if augment is not None else 0
        self._on_gpu = self.device.type == "cuda"
        if self._on_gpu:
            self._images: Any = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        else:
            self._images = np.ascontiguousarray(images)
        self._labels = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(self.device)
        self._mean = [255.0 * m for m in mean]
        self._std = [255.0 * s for s in std]
        self._num_threads, self._prefetch = num_threads, prefetch
        self._runner = self._make_runner(prefetch)
        self._single: DaliRunner | None = None  # for batch_for, so it never disturbs a running epoch

    # ------------------------------------------------------------------ graph
    def _sources(self) -> list[Source]:
        types = self.dali.types
        src = [Source(types.UINT8, 3, "HWC", "gpu" if self._on_gpu else "cpu")]
        if self.augment is not None:
            src += [Source(types.INT32, 1), Source(types.INT32, 0)]
        return src

    def _define(self, nodes: list[Any]) -> list[Any]:
        fn = self.dali.fn
        images = nodes[0]
        mirror: Any = 0
        if self.augment is not None:
            anchor, mirror = nodes[1], nodes[2]
            if self.pad:
                images = fn.slice(images, start=anchor, shape=[self.height, self.width], axis_names="HW",
                                  out_of_bounds_policy="pad", fill_values=0)
        out = fn.crop_mirror_normalize(images, mirror=mirror, mean=self._mean, std=self._std,
                                       dtype=self._out_type, output_layout="CHW")
        return [out]

    def _inputs(self, work: Work) -> tuple[Any, ...]:
        if self._on_gpu:
            idx = torch.from_numpy(work.index).to(self.device)
            images: Any = self._images.index_select(0, idx)
        else:
            images = self._images[work.index]
        if self.augment is None:
            return (images,)
        anchor = np.ascontiguousarray(work.aug[:, :2] - self.pad, dtype=np.int32)
        mirror = np.ascontiguousarray(work.aug[:, 2], dtype=np.int32)
        return images, anchor, mirror

    def _make_runner(self, prefetch: int, batch_size: int | None = None) -> DaliRunner:
        return DaliRunner(self._sources(), self._define, self._inputs, batch_size or self.sampler.batch_size, self.device,
                          num_threads=self._num_threads, prefetch=prefetch)

    # ------------------------------------------------------------------ interface
    def __len__(self) -> int:
        return len(self.sampler)

    def aug_params(self, index: np.ndarray, epoch: int) -> np.ndarray:
        if self.augment is None:
            return np.zeros((len(index), 3), dtype=np.int32)
        return self.augment.params(self.sampler.seed, epoch, index)

    def _work(self, index: np.ndarray, epoch: int) -> Work:
        index = np.asarray(index, dtype=np.int64)
        return Work(index=index, epoch=epoch, aug=self.aug_params(index, epoch))

    def _batch(self, work: Work, outputs: list[Any]) -> Batch:
        return batch_from_outputs(work, outputs, self._labels, self.device, self.dtype, self._on_gpu)

    def epoch(self, epoch: int, start_step: int = 0, aug_epoch: int | None = None) -> Iterator[Batch]:
        """Batches of `epoch` from `start_step` on: a pure function of (seed, epoch).

        `aug_epoch` (default: `epoch`) draws the augmentation of another epoch while keeping
        this epoch's sample order (the teacher cache replays its stored views this way).
        """
        aug = epoch if aug_epoch is None else aug_epoch
        works = (self._work(index, aug) for index in self.sampler.batches(epoch)[start_step:])
        for work, outputs in self._runner.run(works):
            yield self._batch(work, outputs)

    def batch_for(self, index: np.ndarray, epoch: int) -> Batch:
        """Regenerate the exact batch for these sample indices at this augmentation epoch."""
        if self._single is None or self._single.batch_size < len(index):
            self._single = self._make_runner(prefetch=1, batch_size=max(len(index), self.sampler.batch_size))
        ((work, outputs),) = list(self._single.run([self._work(index, epoch)]))
        return self._batch(work, outputs)
