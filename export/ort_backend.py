"""ONNX Runtime: one self-contained `.onnx` file with a dynamic batch axis.

Exported with the torch.export-based ONNX exporter (`dynamo=True`, the default and
maintained path since torch 2.9; it needs onnxscript). The artifact runs on the CPU
execution provider, or on the CUDA provider when onnxruntime-gpu is installed.

An ONNX file is a graph of standard operators plus weights, interpreted by ONNX Runtime's
own kernels; no custom-operator library is registered here, so loading one runs no code
from the artifact and needs no trust in whoever wrote the folder (the sha256 check still
catches corruption).

Precisions:
- fp32 (CPU, CUDA);
- fp16 (CPU, CUDA): the model is cast to half before export, so weights, activations and
  the input are float16. The CPU provider runs it (a Fashion-MNIST resnet8 kept 99.9% of
  top-1 predictions, |Δlogit| <= 0.02) but no faster than fp32 on this AVX2 CPU; it pays
  off on the CUDA provider;
- int8 (CPU): static post-training quantisation in QDQ format (per-channel int8 weights,
  int8 activations, ONNX Runtime's default S8S8 scheme), calibrated with min/max on
  training images. On a Fashion-MNIST resnet8 S8S8 kept 98% of top-1 predictions where
  U8S8 kept 94%.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from export.base import ArtifactFile, Backend, ExportSpec, Runner, register_backend, require
from export.errors import BackendUnavailable, ExportError

INPUT_NAME = "images"
OUTPUT_NAME = "logits"

# torch.onnx builds its operator registry from onnxscript's table, which lists torchvision's
# detection ops (nms, roi_align, roi_pool, deform_conv2d); without torchvision installed it
# logs one warning per op on every export. Our models use none of them, so those lines (and
# only those) are dropped. The LeafSpec FutureWarning comes from torch.export's own pytree
# code during ONNX decomposition, not from anything a user can change.
_ONNX_REGISTRY_LOGGER = "torch.onnx._internal.exporter._registration"
_LEAFSPEC_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


class _NoTorchvisionSkips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("torchvision is not installed")


def _quiet_onnx_registry() -> None:
    logger = logging.getLogger(_ONNX_REGISTRY_LOGGER)
    if not any(isinstance(f, _NoTorchvisionSkips) for f in logger.filters):
        logger.addFilter(_NoTorchvisionSkips())
INSTALL_HINT = "install the onnx extra: pip install 'rrd-fast[onnx]' (onnxruntime, onnx, onnxscript)"
GPU_HINT = ("the CUDA execution provider needs onnxruntime-gpu instead of onnxruntime "
            "(pip uninstall onnxruntime && pip install onnxruntime-gpu)")


def _onnx_file(batch_size: int | None) -> str:
    return "model.onnx" if batch_size is None else f"model_b{batch_size}.onnx"


@register_backend
class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    summary = "ONNX file run by ONNX Runtime (CPU provider, CUDA provider with onnxruntime-gpu)"
    aliases = ("onnx", "ort")
    precisions = {"fp32": ("cpu", "cuda"), "fp16": ("cpu", "cuda"), "int8": ("cpu",)}
    device_specific = False

    def missing(self) -> str | None:
        for module in ("onnxruntime", "onnxscript", "onnx"):
            try:
                __import__(module)
            except Exception:  # noqa: BLE001 - any import failure means "not usable"
                return f"python package {module} is not installed; {INSTALL_HINT}"
        return None

    def unsupported_reason(self, precision: str, device: str) -> str:
        if precision == "bf16":
            return "ONNX Runtime has no bf16 convolution kernels; use fp16 or int8"
        if precision == "int8" and device == "cuda":
            return "int8 QDQ models are tuned for the CPU provider here; on GPU use --backend tensorrt --precision int8"
        return super().unsupported_reason(precision, device)

    def input_dtype(self, precision: str) -> torch.dtype:
        return torch.float16 if precision == "fp16" else torch.float32

    def versions(self) -> dict[str, str]:
        import onnx
        import onnxruntime
        import onnxscript

        return {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__}

    # -- export -------------------------------------------------------------------------

    def export(self, model: nn.Module, spec: ExportSpec, out_dir: Path) -> list[ArtifactFile]:
        sizes: list[int | None] = [None] if spec.dynamic else list(spec.batch_sizes)
        files = []
        for size in sizes:
            target = out_dir / _onnx_file(size)
            if spec.precision == "int8":
                plain = out_dir / f".fp32_{target.name}"
                self._torch_export(model, spec, size, torch.float32, plain)
                self._quantize(plain, target, spec)
                plain.unlink()
            else:
                dtype = torch.float16 if spec.precision == "fp16" else torch.float32
                self._torch_export(model, spec, size, dtype, target)
            files.append(ArtifactFile(target.name, size))
        return files

    @staticmethod
    def _torch_export(model: nn.Module, spec: ExportSpec, size: int | None, dtype: torch.dtype, path: Path) -> None:
        # Batch 2 as the example keeps export from specialising the batch axis to 1.
        example = torch.randn(*spec.input.shape(2 if size is None else size), dtype=dtype)
        model = copy.deepcopy(model).to(dtype) if dtype != torch.float32 else model
        dynamic = ({0: torch.export.Dim("batch", min=1)},) if size is None else None
        _quiet_onnx_registry()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_LEAFSPEC_WARNING, category=FutureWarning)
            torch.onnx.export(
                model, (example,), str(path), dynamo=True, external_data=False, verbose=False,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_shapes=dynamic,
            )

    @staticmethod
    def _quantize(src: Path, dst: Path, spec: ExportSpec) -> None:
        quant = require("onnxruntime.quantization", INSTALL_HINT)
        from onnxruntime.quantization.shape_inference import quant_pre_process

        if spec.calibration is None:
            raise ExportError("--precision int8: calibration images are required (see --calib-samples)")
        prepared = src.with_name(src.name + ".pre.onnx")
        quant_pre_process(str(src), str(prepared))

        class Reader(quant.CalibrationDataReader):
            """Feeds normalised training batches to ONNX Runtime's min/max calibrator."""

            def __init__(self) -> None:
                self._batches: Iterator[torch.Tensor] = iter(spec.calibration())  # type: ignore[misc]

            def get_next(self) -> dict[str, np.ndarray] | None:
                batch = next(self._batches, None)
                return None if batch is None else {INPUT_NAME: batch.detach().cpu().float().numpy()}

        quant.quantize_static(
            str(prepared), str(dst), Reader(), quant_format=quant.QuantFormat.QDQ, per_channel=True,
            activation_type=quant.QuantType.QInt8, weight_type=quant.QuantType.QInt8,
            calibrate_method=quant.CalibrationMethod.MinMax,
        )
        prepared.unlink()

    # -- load ---------------------------------------------------------------------------

    def load(self, folder: Path, files: list[ArtifactFile], sidecar: dict[str, Any], device: str) -> dict[int | None, Runner]:
        ort = require("onnxruntime", INSTALL_HINT)
        if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendUnavailable(f"onnxruntime {ort.__version__} has no CUDA execution provider: {GPU_HINT}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        runners: dict[int | None, Runner] = {}
        for f in files:
            session = ort.InferenceSession(os.fspath(folder / f.name), sess_options=options, providers=providers)
            if device == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
                raise BackendUnavailable(f"{folder / f.name}: onnxruntime could not start its CUDA provider: {GPU_HINT}")
            runners[f.batch_size] = _cuda_runner(session) if device == "cuda" else _cpu_runner(session)
        return runners


def _cpu_runner(session: Any) -> Runner:
    def run(images: torch.Tensor) -> torch.Tensor:
        (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.contiguous().numpy()})
        return torch.from_numpy(logits)

    return run


_NP_TYPES = {torch.float32: np.float32, torch.float16: np.float16}


def _cuda_runner(session: Any) -> Runner:
    """Bind torch CUDA tensors directly (IOBinding), so timing sees no host round trip."""
    num_classes = session.get_outputs()[0].shape[1]

    def run(images: torch.Tensor) -> torch.Tensor:
        images = images.contiguous()
        out = torch.empty((images.shape[0], num_classes), dtype=images.dtype, device=images.device)
        binding = session.io_binding()
        index = images.device.index or 0
        binding.bind_input(INPUT_NAME, "cuda", index, _NP_TYPES[images.dtype], tuple(images.shape), images.data_ptr())
        binding.bind_output(OUTPUT_NAME, "cuda", index, _NP_TYPES[out.dtype], tuple(out.shape), out.data_ptr())
        binding.synchronize_inputs()
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return out

    return run
