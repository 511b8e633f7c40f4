"""Loading frozen teachers: our checkpoint folders or RepDistiller/mdistiller `.pth` files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from rrd_fast.checkpoint import CheckpointError, load_state_strict, read_model_checkpoint, sha256_file
from rrd_fast.models import create_model


def read_repdistiller_state(path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a `{'model': state_dict}` file, read without running any pickled code."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refusals and corrupt zips raise assorted types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: cannot read as a weights-only torch checkpoint ({first[:200]})") from None
    state = blob.get("model", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected {{'model': state_dict}} or a plain state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_teacher(
    checkpoint: str | Path, arch: str, num_classes: int, in_channels: int
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the frozen teacher (eval mode, no grad) and its provenance record."""
    path = Path(checkpoint)
    if not path.exists():
        raise CheckpointError(f"{path}: teacher checkpoint not found (teacher.checkpoint)")
    if path.is_dir():
        model, meta = read_model_checkpoint(path)
        if arch and meta["arch"] != arch:
            raise CheckpointError(f"{path}: checkpoint holds {meta['arch']}, but teacher.arch is {arch}")
        if int(meta["num_classes"]) != num_classes:
            raise CheckpointError(f"{path}: teacher has {meta['num_classes']} classes, the dataset has {num_classes}")
        if int(meta["in_channels"]) != in_channels:
            raise CheckpointError(f"{path}: teacher conv1.weight takes {meta['in_channels']} input channels, the dataset has {in_channels}")
        sha = meta["sha256"]
        arch = meta["arch"]
    else:
        if not arch:
            raise CheckpointError(f"teacher.arch: required to load {path.name}, a .pth file that does not name its architecture")
        model = create_model(arch, num_classes=num_classes, in_channels=in_channels)
        load_state_strict(model, read_repdistiller_state(path), str(path), arch)
        sha = sha256_file(path)
    model.eval().requires_grad_(False)
    return model, {"arch": arch, "checkpoint": str(path), "sha256": sha}
