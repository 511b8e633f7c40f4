"""An exported artifact on disk: its files plus `artifact.json`, and loading it back to run.

The sidecar pins every file by sha256 and records where the artifact came from (the
source checkpoint's sha256), what it expects as input (shape, dtype, normalisation), its
precision, batch sizes and the versions it was built with. Loading checks all of it
before the backend sees a byte, and every run checks the input against it, so a
corrupted, swapped or mismatched artifact fails with one line instead of wrong numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from export.base import ArtifactFile, Backend, InputSpec, Runner, get_backend
from export.errors import ExportError
from rrd_fast.atomic import read_json_object
from rrd_fast.checkpoint import sha256_file

ARTIFACT_SIDECAR = "artifact.json"
ARTIFACT_FORMAT = "rrd-fast-artifact/1"

_REQUIRED = ("backend", "precision", "device", "dynamic_batch", "batch_sizes", "input", "output", "source", "files")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def read_artifact_sidecar(folder: str | Path) -> dict[str, Any]:
    """The validated sidecar of an artifact folder."""
    folder = Path(folder)
    path = folder / ARTIFACT_SIDECAR
    if not path.is_file():
        raise ExportError(f"{path}: artifact sidecar not found (expected a folder written by `python -m export`)")
    meta = read_json_object(path, ExportError)
    if meta.get("format") != ARTIFACT_FORMAT:
        raise ExportError(f"{path}: field 'format' is {meta.get('format')!r}, expected {ARTIFACT_FORMAT!r}")
    for key in _REQUIRED:
        if key not in meta:
            raise ExportError(f"{path}: sidecar is missing field {key!r}")
    if meta["input"].get("dtype") not in _DTYPES:
        raise ExportError(f"{path}: field 'input.dtype' is {meta['input'].get('dtype')!r}, expected one of {sorted(_DTYPES)}")
    return meta


def artifact_files(meta: dict[str, Any], where: Path) -> list[ArtifactFile]:
    try:
        return [ArtifactFile(str(f["name"]), None if f["batch_size"] is None else int(f["batch_size"])) for f in meta["files"]]
    except (KeyError, TypeError, ValueError):
        raise ExportError(f"{where / ARTIFACT_SIDECAR}: field 'files' is malformed") from None


def verify_files(folder: Path, meta: dict[str, Any]) -> None:
    """Every listed file exists and still has the sha256 the sidecar recorded."""
    for entry in meta["files"]:
        path = folder / str(entry.get("name", ""))
        if Path(str(entry.get("name", ""))).name != entry.get("name"):
            raise ExportError(f"{folder / ARTIFACT_SIDECAR}: file name {entry.get('name')!r} must be a plain name inside the folder")
        if not path.is_file():
            raise ExportError(f"{path}: artifact file listed in {ARTIFACT_SIDECAR} is missing")
        actual = sha256_file(path)
        if actual != entry.get("sha256"):
            raise ExportError(
                f"{path}: sha256 {actual[:12]}… does not match {ARTIFACT_SIDECAR} ({str(entry.get('sha256'))[:12]}…); "
                "the file is corrupted or was replaced, re-export it"
            )


@dataclass
class Artifact:
    """A loaded artifact. Calling it runs the artifact itself on a normalised NCHW batch."""

    folder: Path
    sidecar: dict[str, Any]
    backend: Backend
    device: str
    input: InputSpec
    dtype: torch.dtype
    runners: dict[int | None, Runner]

    @property
    def precision(self) -> str:
        return str(self.sidecar["precision"])

    @property
    def static_batch_sizes(self) -> list[int] | None:
        """The batch sizes a static artifact serves; None when any batch size works."""
        return None if None in self.runners else sorted(k for k in self.runners if k is not None)

    def runner_for(self, batch: int) -> Runner:
        runner = self.runners.get(None) or self.runners.get(batch)
        if runner is None:
            raise ExportError(
                f"{self.folder}: built for batch sizes {self.static_batch_sizes} only, got a batch of {batch} "
                "(re-export with that size in --batch-sizes, or --dynamic)"
            )
        return runner

    def check_input(self, images: torch.Tensor) -> None:
        want = (self.input.channels, self.input.height, self.input.width)
        if images.dim() != 4 or tuple(images.shape[1:]) != want:
            raise ExportError(
                f"{self.folder}: input of shape {tuple(images.shape)} does not fit this artifact, which takes "
                f"N×{want[0]}×{want[1]}×{want[2]} normalised images ({self.sidecar['source'].get('arch')} at "
                f"{want[1]}×{want[2]})"
            )
        if images.device.type != self.device:
            raise ExportError(f"{self.folder}: input is on {images.device.type} but this artifact runs on {self.device}")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (float32) for one batch; checks shape, device and batch size first."""
        self.check_input(images)
        runner = self.runner_for(int(images.shape[0]))
        if images.dtype != self.dtype:
            images = images.to(self.dtype)
        out = runner(images)
        return out if out.dtype == torch.float32 else out.float()

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of any size: static artifacts get chunks of their largest size, the tail padded."""
        sizes = self.static_batch_sizes
        n = int(images.shape[0])
        if sizes is None or n in sizes:
            return self(images)
        self.check_input(images)
        step = max(sizes)
        outs = []
        for start in range(0, n, step):
            chunk = images[start:start + step]
            fill = step - chunk.shape[0]
            if fill:
                chunk = torch.cat([chunk, chunk.new_zeros((fill, *chunk.shape[1:]))])
            outs.append(self(chunk)[: step - fill])
        return torch.cat(outs)


def load_artifact(folder: str | Path, device: str | None = None, expect_source_sha: str | None = None) -> Artifact:
    """Verify and load an artifact folder; `device` defaults to the one it was exported for."""
    folder = Path(folder)
    meta = read_artifact_sidecar(folder)
    backend = get_backend(str(meta["backend"]))
    built_for = str(meta["device"])
    device = device or built_for
    if backend.device_specific and device != built_for:
        raise ExportError(f"{folder}: this {backend.name} artifact was compiled for {built_for} and cannot run on {device}")
    source_sha = meta["source"].get("sha256")
    if expect_source_sha is not None and source_sha != expect_source_sha:
        raise ExportError(
            f"{folder}: exported from checkpoint sha256 {str(source_sha)[:12]}…, but the checkpoint now has "
            f"{expect_source_sha[:12]}… (re-export it)"
        )
    backend.check(str(meta["precision"]), device)
    files = artifact_files(meta, folder)
    verify_files(folder, meta)
    shape = meta["input"].get("shape")
    try:
        spec = InputSpec(int(shape[1]), int(shape[2]), int(shape[3]))
    except (TypeError, ValueError, IndexError):
        raise ExportError(f"{folder / ARTIFACT_SIDECAR}: field 'input.shape' is {shape!r}, expected [batch, C, H, W]") from None
    try:
        runners = backend.load(folder, files, meta, device)
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - runtimes raise their own types for unreadable files
        reason = " ".join(str(exc).split())[:300]
        raise ExportError(f"{folder}: {backend.name} cannot load this artifact ({type(exc).__name__}: {reason})") from None
    return Artifact(folder, meta, backend, device, spec, _DTYPES[meta["input"]["dtype"]], runners)
