"""Model checkpoints as `model.safetensors` plus a `model.json` sidecar.

The sidecar carries everything needed to rebuild and trust the model without any
training code: architecture, class count, input normalisation and the weights' sha256.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipelines.errors import UserError
from rrd_fast.atomic import atomic_path, read_json_object, write_json_atomic
from rrd_fast.models import create_model

WEIGHTS_NAME = "model.safetensors"
SIDECAR_NAME = "model.json"
SIDECAR_FORMAT = "rrd-fast-model/1"


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt, or does not match what was asked for."""


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def state_dict_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies; safetensors refuses shared or strided storage."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def write_model_checkpoint(out_dir: str | Path, model: nn.Module, sidecar: dict[str, Any]) -> dict[str, Any]:
    """Write weights then sidecar, each atomically; the sidecar's sha256 pins the weights file.

    `sidecar` must contain at least arch, num_classes, in_channels, image_size and
    normalization {mean, std}. Returns the sidecar as written.
    """
    out_dir = Path(out_dir)
    for key in ("arch", "num_classes", "in_channels", "image_size", "normalization"):
        if key not in sidecar:
            raise CheckpointError(f"sidecar is missing required field {key!r}")
    with atomic_path(out_dir / WEIGHTS_NAME) as tmp:
        save_file(state_dict_for_saving(model), str(tmp), metadata={"format": SIDECAR_FORMAT})
    full = {"format": SIDECAR_FORMAT, **sidecar, "sha256": sha256_file(out_dir / WEIGHTS_NAME)}
    write_json_atomic(out_dir / SIDECAR_NAME, full)
    return full


def read_sidecar(ckpt_dir: str | Path) -> dict[str, Any]:
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / SIDECAR_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: model sidecar not found (expected a run or checkpoint folder)")
    meta = read_json_object(path, CheckpointError)
    if meta.get("format") != SIDECAR_FORMAT:
        raise CheckpointError(f"{path}: field 'format' is {meta.get('format')!r}, expected {SIDECAR_FORMAT!r}")
    return meta


def read_model_checkpoint(ckpt_dir: str | Path, verify_sha: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from its sidecar and load the weights strictly (CPU, eval mode)."""
    ckpt_dir = Path(ckpt_dir)
    meta = read_sidecar(ckpt_dir)
    weights = ckpt_dir / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{weights}: weights file not found")
    if verify_sha:
        actual = sha256_file(weights)
        if actual != meta.get("sha256"):
            raise CheckpointError(f"{weights}: sha256 {actual[:12]}… does not match sidecar {str(meta.get('sha256'))[:12]}…")
    model = create_model(meta["arch"], num_classes=int(meta["num_classes"]), in_channels=int(meta["in_channels"]))
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{weights}: cannot read safetensors file ({exc})") from None
    load_state_strict(model, state, str(weights), meta["arch"])
    model.eval()
    return model, meta


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str, arch: str) -> None:
    """Load with strict names and shapes, turning PyTorch's multi-line report into one line."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not fit {arch}: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise CheckpointError(
                f"{source}: {key} has shape {tuple(value.shape)}, {arch} expects {tuple(own[key].shape)}"
                " (another architecture or class count?)"
            )
    model.load_state_dict(state, strict=True)
