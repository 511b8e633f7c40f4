"""Pooled features of the frozen backbone, computed once where that is exact (BatchNorm in eval mode).

With `bn=eval` the backbone is a fixed per-sample function, so a sample's feature depends
only on its pixels: the test features are computed once per probe, and with
`feature_views` V > 0 the training features of V augmented views (augmentation epochs
0..V-1, the same crops and flips the pipeline would draw) are computed once and stored in
`features.safetensors`; training epoch e then reads view e mod V. With V >= epochs every
epoch still sees its own augmentation, so the probe matches V = 0 up to float rounding.
With `bn=train` none of this applies: each batch's statistics change every feature, so the
probe runs the backbone on every batch.

The file's metadata fingerprints what the features depend on (student weights, resized
pixels, augmentation, normalisation, seed, V); a mismatch rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from pipelines.backends import Pipeline
from rrd_fast.atomic import atomic_path

FEATURES_NAME = "features.safetensors"


@torch.no_grad()
def pooled(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The pooled penultimate vector (ModelOutput.pooled) in fp32, without autograd."""
    return backbone(images, features=True).pooled.float()


@torch.no_grad()
def split_features(backbone: nn.Module, pipe: Pipeline, epoch: int, n: int, batch_size: int) -> torch.Tensor:
    """N×D features of every sample at augmentation epoch `epoch`, in sample-index order."""
    out: torch.Tensor | None = None
    for start in range(0, n, batch_size):
        index = np.arange(start, min(start + batch_size, n), dtype=np.int64)
        feats = pooled(backbone, pipe.batch_for(index, epoch).images)
        if out is None:
            out = torch.empty((n, feats.shape[1]), dtype=torch.float32, device=feats.device)
        out[start:start + len(index)] = feats
    assert out is not None
    return out


def fingerprint(student_sha256: str, pixels: np.ndarray, fields: dict[str, Any]) -> str:
    """A stable string of everything the stored features depend on."""
    digest = hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()
    return json.dumps({"student_sha256": student_sha256, "pixels_sha256": digest, **fields}, sort_keys=True)


def load_views(path: Path, expected: str, views: int, device: torch.device) -> torch.Tensor | None:
    """The stored V×N×D views if `path` holds features with this fingerprint, else None."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            if (fh.metadata() or {}).get("fingerprint") != expected:
                return None
            stored = fh.get_tensor("train")
    except Exception:  # a torn or foreign file is rebuilt, not trusted
        return None
    if stored.ndim != 3 or stored.shape[0] != views:
        return None
    return stored.to(device)


def build_views(backbone: nn.Module, pipe: Pipeline, n: int, views: int, batch_size: int) -> torch.Tensor:
    """V×N×D: view v holds every training sample's feature at augmentation epoch v."""
    return torch.stack([split_features(backbone, pipe, v, n, batch_size) for v in range(views)])


def save_views(path: Path, train: torch.Tensor, stamp: str) -> None:
    """Write the views with their fingerprint `stamp` (atomically: a killed write leaves no torn file)."""
    with atomic_path(path) as tmp:
        save_file({"train": train.detach().to("cpu").contiguous()}, str(tmp), metadata={"fingerprint": stamp})
