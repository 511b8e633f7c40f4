"""Torch-TensorRT (dynamo IR): TensorRT engines embedded in a saved ExportedProgram.

GPU machines only, and an optional extra: TensorRT's libraries come from NVIDIA's own
package index, and when they are missing `import torch_tensorrt` raises a bare
`Exception`, so the import is guarded and a missing install is reported with the command
that fixes it.

- Static input shapes, one engine file per batch size, by default: dynamic-shape
  save/load has open upstream bugs. `--dynamic` builds one engine with a
  [1, max batch] profile instead.
- fp32/fp16: the model and input are cast to the precision, and the precision is also
  passed to the builder (`use_explicit_typing` on versions that have it, otherwise
  `enabled_precisions`), so both strongly and weakly typed TensorRT builds run it.
- int8: post-training quantisation through NVIDIA ModelOpt (`mtq.quantize` with
  `INT8_DEFAULT_CFG`, min/max calibrated on training images), then compiled with
  `enabled_precisions={torch.int8}`, as Torch-TensorRT's quantisation guide describes
  (torch_tensorrt >= 2.5). Without ModelOpt, or on older versions, int8 is refused with
  a message saying so.
- Saved with `torch_tensorrt.save(..., output_format="exported_program")`, reloaded
  with `torch.export.load(path).module()` after importing torch_tensorrt (which registers
  the engine-execution op).

A serialised TensorRT engine is executable GPU code and can name plugin libraries that
TensorRT loads with it, so loading an engine runs native code: the loader refuses folders
other users can write unless they are trusted (see `export.artifact`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from export.base import ArtifactFile, Backend, ExportSpec, Runner, register_backend, require
from export.errors import BackendUnavailable, ExportError

INSTALL_HINT = (
    "torch-tensorrt is an optional extra for NVIDIA GPU machines: "
    "pip install 'rrd-fast[tensorrt]' --extra-index-url https://pypi.nvidia.com "
    "(TensorRT's libraries come from NVIDIA's package index; pick the torch-tensorrt release that matches your torch)"
)
MODELOPT_HINT = "int8 post-training quantisation needs NVIDIA ModelOpt: pip install nvidia-modelopt"
INT8_MIN_VERSION = (2, 5)


@functools.lru_cache(maxsize=1)
def _import_problem() -> str | None:
    try:
        import torch_tensorrt  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - it raises a bare Exception when TensorRT's libraries are missing
        reason = " ".join(str(exc).split()) or type(exc).__name__
        return f"cannot import torch_tensorrt ({reason[:120]}); {INSTALL_HINT}"
    return None


def _version_tuple(text: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _engine_file(batch_size: int | None) -> str:
    return "model.ep" if batch_size is None else f"model_b{batch_size}.ep"


@register_backend
class TensorRTBackend(Backend):
    name = "tensorrt"
    summary = "Torch-TensorRT dynamo engines saved as an ExportedProgram (NVIDIA GPUs)"
    aliases = ("trt", "torch_tensorrt")
    precisions = {"fp32": ("cuda",), "fp16": ("cuda",), "int8": ("cuda",)}
    dynamic_by_default = False
    device_specific = True
    loads_native_code = True

    def missing(self) -> str | None:
        return _import_problem()

    def unsupported_reason(self, precision: str, device: str) -> str:
        if device == "cpu":
            return "TensorRT engines run on NVIDIA GPUs only; use --device cuda"
        if precision == "bf16":
            return "this exporter offers fp32, fp16 and int8"
        return super().unsupported_reason(precision, device)

    def check(self, precision: str, device: str) -> None:
        super().check(precision, device)
        if precision == "int8":
            import torch_tensorrt

            if _version_tuple(torch_tensorrt.__version__) < INT8_MIN_VERSION:
                raise BackendUnavailable(
                    f"--precision int8: post-training quantisation is not supported by torch_tensorrt "
                    f"{torch_tensorrt.__version__} (needs >= {'.'.join(map(str, INT8_MIN_VERSION))} with nvidia-modelopt)"
                )
            require("modelopt.torch.quantization", MODELOPT_HINT)

    def input_dtype(self, precision: str) -> torch.dtype:
        return torch.float16 if precision == "fp16" else torch.float32

    def versions(self) -> dict[str, str]:
        import torch_tensorrt

        info = {"torch_tensorrt": torch_tensorrt.__version__}
        try:
            import tensorrt

            info["tensorrt"] = tensorrt.__version__
        except Exception:  # noqa: BLE001
            pass
        try:
            import modelopt

            info["modelopt"] = modelopt.__version__
        except Exception:  # noqa: BLE001
            pass
        return info

    # -- export -------------------------------------------------------------------------

    def export(self, model: nn.Module, spec: ExportSpec, out_dir: Path) -> list[ArtifactFile]:
        trt = require("torch_tensorrt", INSTALL_HINT)
        dtype = torch.float16 if spec.precision == "fp16" else torch.float32
        model = copy.deepcopy(model).to(device="cuda", dtype=dtype).eval()
        if spec.precision == "int8":
            model = self._calibrate(model, spec)
        files = []
        sizes: list[int | None] = [None] if spec.dynamic else list(spec.batch_sizes)
        for size in sizes:
            example = torch.randn(*spec.input.shape(size or max(spec.batch_sizes)), dtype=dtype, device="cuda")
            if size is None:
                lo, hi = spec.input.shape(1), spec.input.shape(max(spec.batch_sizes))
                inputs = [trt.Input(min_shape=lo, opt_shape=hi, max_shape=hi, dtype=dtype)]
            else:
                inputs = [trt.Input(tuple(example.shape), dtype=dtype)]
            target = out_dir / _engine_file(size)
            if spec.precision == "int8":
                self._compile_int8(trt, model, example, target)
            else:
                with torch.no_grad():
                    compiled = trt.compile(model, ir="dynamo", **{_inputs_key(trt.compile): inputs},
                                           **_precision_kwargs(trt, dtype))
                    _save(trt, compiled, target, example)
            files.append(ArtifactFile(target.name, size))
        return files

    @staticmethod
    def _calibrate(model: nn.Module, spec: ExportSpec) -> nn.Module:
        mtq = require("modelopt.torch.quantization", MODELOPT_HINT)
        if spec.calibration is None:
            raise ExportError("--precision int8: calibration images are required (see --calib-samples)")

        def forward_loop(m: nn.Module) -> None:
            with torch.no_grad():
                for batch in spec.calibration():  # type: ignore[misc]
                    m(batch.to("cuda"))

        return mtq.quantize(model, mtq.INT8_DEFAULT_CFG, forward_loop=forward_loop)

    @staticmethod
    def _compile_int8(trt: Any, model: nn.Module, example: torch.Tensor, target: Path) -> None:
        from modelopt.torch.quantization.utils import export_torch_mode

        with torch.no_grad(), export_torch_mode():
            program = torch.export.export(model, (example,), strict=False)
            compiled = trt.dynamo.compile(program, **{_inputs_key(trt.dynamo.compile): [example]},
                                          enabled_precisions={torch.int8}, min_block_size=1)
            _save(trt, compiled, target, example)

    # -- load ---------------------------------------------------------------------------

    def load(self, folder: Path, files: list[ArtifactFile], sidecar: dict[str, Any], device: str) -> dict[int | None, Runner]:
        require("torch_tensorrt", INSTALL_HINT)  # registers the engine-execution op before deserialising
        runners: dict[int | None, Runner] = {}
        for f in files:
            module = torch.export.load(str(folder / f.name)).module()

            def run(images: torch.Tensor, module: Any = module) -> torch.Tensor:
                with torch.inference_mode():
                    out = module(images)
                return out[0] if isinstance(out, (tuple, list)) else out

            runners[f.batch_size] = run
        return runners


def _precision_kwargs(trt: Any, dtype: torch.dtype) -> dict[str, Any]:
    """Strong typing where the installed version has it (the dtype is in the graph), else weak typing."""
    try:
        fields = {f.name for f in dataclasses.fields(trt.dynamo.CompilationSettings)}
    except (AttributeError, TypeError):
        fields = set()
    if "use_explicit_typing" in fields:
        return {"use_explicit_typing": True}
    return {"enabled_precisions": {dtype}}


def _inputs_key(fn: Any) -> str:
    """Torch-TensorRT renamed `inputs` to `arg_inputs` (compile, dynamo.compile, save); use whichever `fn` takes."""
    try:
        return "arg_inputs" if "arg_inputs" in inspect.signature(fn).parameters else "inputs"
    except (TypeError, ValueError):
        return "inputs"


def _save(trt: Any, compiled: Any, target: Path, example: torch.Tensor) -> None:
    trt.save(compiled, str(target), output_format="exported_program", **{_inputs_key(trt.save): [example]})

