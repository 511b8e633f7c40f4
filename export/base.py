"""The exporter interface and the backend registry.

A backend turns a student (an eval-mode `nn.Module`) into files on disk and loads those
files back as callables that run the artifact itself. Adding a backend is one module that
subclasses `Backend`, decorates it with `@register_backend` and is imported by
`export/__init__.py`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Mapping

import torch
from torch import nn

from export.errors import BackendUnavailable, ExportError
from pipelines.registry import Registry

PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8")

# What a precision means for the tensors an artifact takes and for autocast.
TORCH_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

Runner = Callable[[torch.Tensor], torch.Tensor]
"""Runs one batch through the artifact: images in the artifact's input dtype -> logits."""

CalibrationSource = Callable[[], Iterable[torch.Tensor]]
"""Yields normalised float32 NCHW batches of training images (for int8 calibration)."""


@dataclass(frozen=True)
class InputSpec:
    """The one input every student takes: a normalised NCHW image batch."""

    channels: int
    height: int
    width: int

    def shape(self, batch: int | str) -> list[int | str]:
        return [batch, self.channels, self.height, self.width]


@dataclass(frozen=True)
class ExportSpec:
    """Everything an exporter needs besides the model."""

    precision: str
    device: str
    batch_sizes: tuple[int, ...]
    input: InputSpec
    dynamic: bool
    source_meta: dict[str, Any]
    calibration: CalibrationSource | None = None


@dataclass(frozen=True)
class ArtifactFile:
    """One file of an artifact; `batch_size` is None when the file serves any batch size."""

    name: str
    batch_size: int | None


class Backend(ABC):
    """One way to deploy a student. Subclasses declare what they support and implement export/load."""

    name: ClassVar[str]
    summary: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    # precision -> devices the artifact can run on
    precisions: ClassVar[Mapping[str, tuple[str, ...]]]
    # Whether the default is one artifact for all batch sizes (True) or one per batch size.
    dynamic_by_default: ClassVar[bool] = True
    supports_dynamic: ClassVar[bool] = True
    # Whether the files are compiled for the export device (and run nowhere else).
    device_specific: ClassVar[bool] = True
    # Whether loading the files runs native code from them (shared libraries, engine plugins):
    # such artifacts are refused when other users can write them (see export.artifact).
    loads_native_code: ClassVar[bool] = False

    def missing(self) -> str | None:
        """None when the backend's runtime is importable; otherwise what is missing and how to get it."""
        return None

    def versions(self) -> dict[str, str]:
        """Versions of the runtime packages an artifact depends on (recorded in its sidecar)."""
        return {}

    def unsupported_reason(self, precision: str, device: str) -> str:
        """Why this precision/device pair is refused; backends override to explain their limits."""
        devices = self.precisions.get(precision)
        if devices is None:
            return f"supported precisions: {', '.join(self.precisions)}"
        return f"{precision} runs on {', '.join(devices)} only"

    def input_dtype(self, precision: str) -> torch.dtype:
        """The dtype the artifact's input tensor must have (the runner receives this dtype)."""
        return torch.float32

    def check(self, precision: str, device: str) -> None:
        """Refuse, with a one-line reason, anything this backend cannot build or run here."""
        if precision not in PRECISIONS:
            raise ExportError(f"--precision: unknown precision {precision!r} (known: {', '.join(PRECISIONS)})")
        gone = self.missing()
        if gone is not None:
            raise BackendUnavailable(f"backend {self.name!r} is not available: {gone}")
        if device not in ("cpu", "cuda"):
            raise ExportError(f"--device: unknown device {device!r} (known: cpu, cuda)")
        if precision not in self.precisions or device not in self.precisions[precision]:
            raise ExportError(
                f"--precision {precision}: backend {self.name!r} cannot run {precision} on {device} "
                f"({self.unsupported_reason(precision, device)})"
            )
        if device == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable(f"--device cuda: backend {self.name!r} needs a CUDA device and none is visible")

    @abstractmethod
    def export(self, model: nn.Module, spec: ExportSpec, out_dir: Path) -> list[ArtifactFile]:
        """Write the artifact's files into `out_dir` (a fresh staging folder) and list them."""

    @abstractmethod
    def load(self, folder: Path, files: list[ArtifactFile], sidecar: dict[str, Any], device: str) -> dict[int | None, Runner]:
        """Load the artifact's files; map each served batch size (None = any) to its runner."""


BACKENDS: Registry[Backend] = Registry("backend", setting="--backend", error=ExportError)


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Class decorator: one instance per backend, looked up by `cls.name` or one of `cls.aliases`."""
    BACKENDS.register(cls(), aliases=cls.aliases)
    return cls


def get_backend(name: str) -> Backend:
    return BACKENDS.get(name)


def list_backends() -> list[str]:
    return BACKENDS.names()


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """'1,8,64' -> (1, 8, 64); duplicates dropped, order kept; anything else is a one-line error."""
    sizes: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise ExportError(f"--batch-sizes: {part!r} is not a positive integer (expected e.g. 1,8,64,256)")
        if int(part) not in sizes:
            sizes.append(int(part))
    return tuple(sizes)


def require(module: str, hint: str) -> Any:
    """Import an optional dependency or raise BackendUnavailable naming it and how to install it.

    Some packages (torch_tensorrt) raise a bare Exception when their native libraries are
    missing, so anything raised by the import counts as "not available".
    """
    import importlib

    try:
        return importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - see docstring
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise BackendUnavailable(f"cannot import {module} ({reason[:160]}); {hint}") from None
