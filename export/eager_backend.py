"""Eager PyTorch: the baseline every comparison needs.

The artifact is the student's own checkpoint (safetensors plus a `model.json` holding the
fields of `ModelCard` that rebuild it), rebuilt from the model zoo at load time: loading
reads tensors only and runs no code from the artifact folder. Lower precisions use
autocast, as a user running eager would.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from export.base import TORCH_DTYPES, ArtifactFile, Backend, ExportSpec, Runner, register_backend
from rrd_fast.checkpoint import SIDECAR_NAME, WEIGHTS_NAME, ModelCard, read_model_checkpoint, write_model_checkpoint


@register_backend
class EagerBackend(Backend):
    name = "eager"
    summary = "plain PyTorch forward (autocast for fp16/bf16)"
    aliases = ("torch", "pytorch")
    precisions = {"fp32": ("cpu", "cuda"), "bf16": ("cpu", "cuda"), "fp16": ("cuda",)}
    device_specific = False

    def unsupported_reason(self, precision: str, device: str) -> str:
        if precision == "fp16" and device == "cpu":
            return "fp16 autocast on CPU has no fast kernels; use bf16 on CPU"
        if precision == "int8":
            return "eager int8 is not offered; int8 comes from tensorrt or onnxruntime"
        return super().unsupported_reason(precision, device)

    def export(self, model: nn.Module, spec: ExportSpec, out_dir: Path) -> list[ArtifactFile]:
        card = ModelCard.from_dict(spec.source_meta, "the source checkpoint's model.json")
        write_model_checkpoint(out_dir, model, card.essentials())
        return [ArtifactFile(WEIGHTS_NAME, None), ArtifactFile(SIDECAR_NAME, None)]

    def load(self, folder: Path, files: list[ArtifactFile], sidecar: dict[str, Any], device: str) -> dict[int | None, Runner]:
        model, _ = read_model_checkpoint(folder)
        model = model.to(device).eval()
        precision = sidecar["precision"]
        dtype = TORCH_DTYPES[precision]

        def run(images: torch.Tensor) -> torch.Tensor:
            cast = (torch.autocast(device_type=device, dtype=dtype) if precision != "fp32"
                    else contextlib.nullcontext())
            with torch.inference_mode(), cast:
                return model(images)

        return {None: run}
