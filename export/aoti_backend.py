"""AOTInductor: `torch.export` then `aoti_compile_and_package` into a `.pt2` package.

The package holds compiled C++ (CPU) or Triton (CUDA) kernels for the export device and
runs only there. One package serves every batch size (a symbolic batch dimension) unless
`--static` asks for one package per batch size. fp16/bf16 cast the weights before export,
so the compiled kernels run in that dtype; fp16 is offered on CUDA only (CPU kernels for
half are slow; use bf16 there).

Compiling is slow on small CPUs (tens of seconds per package with gcc); the bench reuses
packages it finds for the same checkpoint and settings.

A `.pt2` package is a zip holding a shared library that `aoti_load_package` loads and
runs: loading a package runs native code from it, so only load packages you built or
whose writers you trust (the loader refuses folders other users can write; see
`export.artifact`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from export.base import TORCH_DTYPES, ArtifactFile, Backend, ExportSpec, Runner, register_backend


def _package_file(batch_size: int | None) -> str:
    return "model.pt2" if batch_size is None else f"model_b{batch_size}.pt2"


@register_backend
class AOTInductorBackend(Backend):
    name = "aotinductor"
    summary = "torch.export + AOTInductor compiled .pt2 package"
    aliases = ("aoti", "inductor")
    precisions = {"fp32": ("cpu", "cuda"), "bf16": ("cpu", "cuda"), "fp16": ("cuda",)}
    device_specific = True
    loads_native_code = True

    def missing(self) -> str | None:
        if not hasattr(torch._inductor, "aoti_compile_and_package"):
            return f"torch {torch.__version__} lacks torch._inductor.aoti_compile_and_package (needs torch >= 2.6)"
        return None

    def unsupported_reason(self, precision: str, device: str) -> str:
        if precision == "fp16" and device == "cpu":
            return "half-precision CPU kernels are slow; use bf16 on CPU"
        if precision == "int8":
            return "int8 comes from tensorrt or onnxruntime"
        return super().unsupported_reason(precision, device)

    def input_dtype(self, precision: str) -> torch.dtype:
        return TORCH_DTYPES[precision]

    def versions(self) -> dict[str, str]:
        import platform
        import subprocess

        info = {"inductor": torch.__version__}
        try:
            cc = subprocess.run(["gcc", "-dumpfullversion"], capture_output=True, text=True, timeout=10).stdout.strip()
            if cc:
                info["gcc"] = cc
        except (OSError, subprocess.SubprocessError):
            pass
        info["machine"] = platform.machine()
        return info

    def export(self, model: nn.Module, spec: ExportSpec, out_dir: Path) -> list[ArtifactFile]:
        dtype = TORCH_DTYPES[spec.precision]
        model = copy.deepcopy(model).to(device=spec.device, dtype=dtype).eval()
        sizes: list[int | None] = [None] if spec.dynamic else list(spec.batch_sizes)
        files = []
        for size in sizes:
            example = torch.randn(*spec.input.shape(2 if size is None else size), dtype=dtype, device=spec.device)
            dynamic = ({0: torch.export.Dim("batch", min=1)},) if size is None else None
            with torch.no_grad():
                program = torch.export.export(model, (example,), dynamic_shapes=dynamic)
                target = out_dir / _package_file(size)
                torch._inductor.aoti_compile_and_package(program, package_path=str(target))
            files.append(ArtifactFile(target.name, size))
        return files

    def load(self, folder: Path, files: list[ArtifactFile], sidecar: dict[str, Any], device: str) -> dict[int | None, Runner]:
        runners: dict[int | None, Runner] = {}
        for f in files:
            compiled = torch._inductor.aoti_load_package(str(folder / f.name))

            def run(images: torch.Tensor, compiled: Any = compiled) -> torch.Tensor:
                with torch.inference_mode():
                    return compiled(images)

            runners[f.batch_size] = run
        return runners
