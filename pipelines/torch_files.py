"""Torch/Pillow pipeline for datasets of encoded images (Tiny-ImageNet, ImageNet folders).

Pillow decodes, crops and resizes in a thread pool (it releases the GIL while it works),
a few batches ahead of the consumer. Training takes the random-resized-crop box from
`ResizedCropSpec.params(seed, epoch, index)` as a sub-pixel region of the decoded image,
resizes it bilinearly (antialiased when shrinking) to the crop size and flips; evaluation
resizes the shorter side and takes the centre crop (`pipelines.views.CenterCropSpec`).
Normalisation is one vectorised torch op per batch. No torchvision.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from pipelines.augment import ResizedCropSpec
from pipelines.base import FileSplitPipeline
from pipelines.batch import Batch
from pipelines.errors import DataError
from pipelines.normalize import Normalizer
from pipelines.sampler import EpochSampler
from pipelines.views import CenterCropSpec, train_box

_READ_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
# What Pillow raises for a file that is not a decodable image.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def default_workers() -> int:
    try:
        return max(1, min(len(os.sched_getaffinity(0)), 16))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, min(os.cpu_count() or 1, 16))


def load_view(path: Path, size: int, aug_row: np.ndarray | None, center: CenterCropSpec | None) -> np.ndarray:
    """Decode one image and return its size×size×3 uint8 view (train box + flip, or centre crop).

    Raises the underlying OSError/FileNotFoundError; callers decide what a bad file means.
    """
    with Image.open(path) as im:
        im.load()
        rgb = im if im.mode == "RGB" else im.convert("RGB")
        w, h = rgb.size
        if aug_row is not None:
            box = train_box(aug_row, w, h)
        elif center is not None:
            box = center.box(w, h)
        else:
            box = (0.0, 0.0, float(w), float(h))
        out = rgb.resize((size, size), Image.BILINEAR, box=box)
    if aug_row is not None and aug_row[4] >= 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(out)


class FilePipeline(FileSplitPipeline):
    """Yields `Batch`es of a `FileSplit`, decoded with Pillow in `workers` threads."""

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
        workers: int | None = None,
        on_corrupt: str = "error",
        prefetch: int = 2,
    ) -> None:
        super().__init__(paths, labels, sampler, augment, size, center, device, dtype, on_corrupt)
        self.workers = workers or default_workers()
        self.prefetch = max(0, prefetch)
        self._normalize = Normalizer(mean, std, self.device, dtype)
        self._pool: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ decoding
    def _load(self, i: int, aug_row: np.ndarray | None) -> np.ndarray | None:
        path = self.paths[i]
        if self.corrupt.is_skipped(i):
            return None
        try:
            return load_view(path, self.size, aug_row, None if aug_row is not None else self.center)
        except _READ_ERRORS as exc:
            raise DataError(f"{path}: cannot read image file ({exc.strerror or type(exc).__name__})") from None
        except _DECODE_ERRORS as exc:
            self.corrupt.handle(i, path, str(exc) or type(exc).__name__)
            return None

    def _load_chunk(self, items: list[tuple[int, np.ndarray | None]]) -> list[np.ndarray | None]:
        return [self._load(i, row) for i, row in items]

    def _submit(self, index: np.ndarray, epoch: int) -> tuple[np.ndarray, np.ndarray, list[Future]]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="pillow-decode")
        index = np.asarray(index, dtype=np.int64)
        aug = self.aug_params(index, epoch)
        rows = [aug[k] if self.augment is not None else None for k in range(len(index))]
        items = list(zip(index.tolist(), rows))
        chunk = max(4, -(-len(items) // (2 * self.workers)))
        futures = [self._pool.submit(self._load_chunk, items[s:s + chunk]) for s in range(0, len(items), chunk)]
        return index, aug, futures

    def _collect(self, index: np.ndarray, aug: np.ndarray, futures: list[Future], epoch: int) -> Batch:
        views = [v for f in futures for v in f.result()]
        keep = [k for k, v in enumerate(views) if v is not None]
        if len(keep) < len(views):
            index, aug = index[keep], aug[keep]
        if keep:
            pixels = torch.from_numpy(np.stack([views[k] for k in keep]))
        else:
            pixels = torch.zeros((0, self.size, self.size, 3), dtype=torch.uint8)
        return self._batch(self._normalize(pixels.to(self.device).permute(0, 3, 1, 2)), index, aug, epoch)

    # ------------------------------------------------------------------ interface
    def _batches(self, plan: list[np.ndarray], epoch: int) -> Iterator[Batch]:
        """`prefetch` batches decoding ahead; corrupt files skipped (policy `skip`) shrink their batch."""
        ahead: deque = deque()
        try:
            for index in plan:
                ahead.append(self._submit(index, epoch))
                if len(ahead) > self.prefetch:
                    batch = self._collect(*ahead.popleft(), epoch)
                    if len(batch):
                        yield batch
            while ahead:
                batch = self._collect(*ahead.popleft(), epoch)
                if len(batch):
                    yield batch
        finally:
            for _, _, futures in ahead:
                for f in futures:
                    f.cancel()

    def batch_for(self, index: np.ndarray, epoch: int) -> Batch:
        """Regenerate the exact batch for these sample indices at this augmentation epoch."""
        return self._collect(*self._submit(index, epoch), epoch)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __del__(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
