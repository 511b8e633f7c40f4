"""Turn a student checkpoint into an artifact folder: backend files plus `artifact.json`."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from export.artifact import ARTIFACT_FORMAT, ARTIFACT_SIDECAR, BuiltBy, dtype_name, prepare_out_folder, write_artifact_sidecar
from export.base import CalibrationSource, ExportSpec, InputSpec, get_backend
from export.data import DataSource, calibration_source, data_source
from export.errors import ExportError
from rrd_fast.checkpoint import SIDECAR_NAME, ModelCard, read_model_checkpoint, sha256_file

DEFAULT_BATCH_SIZES: tuple[int, ...] = (1, 8, 64, 256)
DEFAULT_CALIB_SAMPLES = 512


def resolve_device(requested: str) -> str:
    """`auto` -> cuda when a CUDA device is visible, else cpu; an explicit cuda needs one."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ExportError("--device cuda: no CUDA device is available to this torch "
                          f"({torch.__version__}); use --device cpu or auto")
    return requested


def runtime_versions() -> dict[str, str]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    if torch.version.cuda:
        info["cuda"] = str(torch.version.cuda)
    return info


def device_name(device: str) -> str:
    """A readable name for reports: the GPU's, or the CPU model and how many cores this process may use."""
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cores} cpus"


def export_model(
    model: torch.nn.Module,
    meta: dict[str, Any],
    source_dir: str | Path,
    backend_name: str,
    out: str | Path,
    precision: str = "fp32",
    device: str = "cpu",
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    dynamic: bool | None = None,
    calibration: CalibrationSource | None = None,
    calibration_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Export `model` (read from the checkpoint at `source_dir`, sidecar `meta`) and write the artifact sidecar last.

    Files are built in a staging folder and moved into `out` only once the backend is done,
    and the old sidecar is removed first, so an interrupted export never looks valid.
    """
    meta = ModelCard.from_dict(meta, Path(source_dir) / SIDECAR_NAME).to_dict()
    backend = get_backend(backend_name)
    backend.check(precision, device)
    dynamic = backend.dynamic_by_default if dynamic is None else dynamic
    if dynamic and not backend.supports_dynamic:
        raise ExportError(f"--dynamic: backend {backend.name!r} only builds static batch sizes")
    if precision == "int8" and calibration is None:
        raise ExportError("--precision int8 needs calibration images from the training split (see --calib-samples, --data)")
    if not batch_sizes:
        raise ExportError("--batch-sizes: at least one batch size is required")
    spec = ExportSpec(
        precision=precision, device=device, batch_sizes=tuple(batch_sizes),
        input=InputSpec(int(meta["in_channels"]), int(meta["image_size"]), int(meta["image_size"])),
        dynamic=dynamic, source_meta=meta, calibration=calibration,
    )
    out = prepare_out_folder(out)
    (out / ARTIFACT_SIDECAR).unlink(missing_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    try:
        files = backend.export(model.eval(), spec, staging)
        entries = []
        for f in files:
            os.replace(staging / f.name, out / f.name)
            entries.append({"name": f.name, "batch_size": f.batch_size, "sha256": sha256_file(out / f.name),
                            "bytes": (out / f.name).stat().st_size})
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    in_dtype = dtype_name(backend.input_dtype(precision))
    sidecar = {
        "format": ARTIFACT_FORMAT,
        "backend": backend.name,
        "precision": precision,
        "device": device,
        "device_name": device_name(device),
        "dynamic_batch": dynamic,
        "batch_sizes": list(spec.batch_sizes),
        "input": {
            "name": "images", "layout": "NCHW", "shape": spec.input.shape("batch"), "dtype": in_dtype,
            "normalization": meta["normalization"], "image_size": int(meta["image_size"]),
            "note": "pixels scaled to [0, 1], then (x - mean) / std per channel",
        },
        "output": {"name": "logits", "shape": ["batch", int(meta["num_classes"])], "dtype": "float32"},
        "source": {
            "checkpoint": str(Path(source_dir).resolve()),
            "sha256": meta.get("sha256"),
            "arch": meta.get("arch"),
            "num_classes": meta.get("num_classes"),
            "method": meta.get("method"),
            "teacher": meta.get("teacher"),
            "dataset": meta.get("dataset"),
            "top1_final": meta.get("top1_final"),
            "top1_best": meta.get("top1_best"),
        },
        "files": entries,
        "versions": {**runtime_versions(), **backend.versions()},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "built_by": BuiltBy.here().to_dict(),
    }
    if calibration_info:
        sidecar["calibration"] = calibration_info
    return write_artifact_sidecar(out, sidecar)


def export_checkpoint(
    run_dir: str | Path,
    backend_name: str,
    out: str | Path,
    precision: str = "fp32",
    device: str = "cpu",
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    dynamic: bool | None = None,
    data: DataSource | None = None,
    calib_samples: int = DEFAULT_CALIB_SAMPLES,
) -> dict[str, Any]:
    """Read a student checkpoint (sha-verified) and export it; int8 calibrates on its training split."""
    get_backend(backend_name).check(precision, device)  # fail before reading anything big
    model, meta = read_model_checkpoint(run_dir)
    calibration, info = None, None
    if precision == "int8":
        if calib_samples <= 0:
            raise ExportError(f"--calib-samples must be positive for int8, got {calib_samples}")
        source = data or data_source(meta)
        calibration, info = calibration_source(source, meta, calib_samples)
    return export_model(model, meta, run_dir, backend_name, out, precision, device, batch_sizes, dynamic,
                        calibration, info)
