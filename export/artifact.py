"""An exported artifact on disk: its files plus `artifact.json`, and loading it back to run.

`ArtifactCard` is the sidecar's schema. It pins every file by sha256 and records where the
artifact came from (the source checkpoint's sha256), what it expects as input (shape,
dtype, normalisation), its precision, batch sizes, the versions it was built with, and who
built it (host, user, time). Loading validates all of it before the backend sees a byte,
and every run checks the input against it, so a corrupted, swapped or mismatched artifact
fails with one line instead of wrong numbers.

Trust: the sha256s protect against corruption, not against someone who can write the
folder (they can replace a file and its recorded sha together). AOTInductor packages are
shared libraries and TensorRT engines may name plugin libraries, so loading either runs
native code from the folder; those backends are refused when the folder or a file in it is
writable by other users or owned by someone else, unless the caller trusts it
(`trust=True`, `--trust-artifact`). ONNX files and eager checkpoints hold no code and are
loaded regardless.
"""

from __future__ import annotations

import datetime as _dt
import getpass
import os
import re
import socket
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from export.base import PRECISIONS, ArtifactFile, Backend, InputSpec, Runner, get_backend
from export.errors import ExportError
from rrd_fast.atomic import read_json_object, write_json_atomic
from rrd_fast.checkpoint import MAX_IMAGE_SIZE, MAX_IN_CHANNELS, MAX_NUM_CLASSES, SHA256_PATTERN, JsonFields, sha256_file

ARTIFACT_SIDECAR = "artifact.json"
ARTIFACT_FORMAT = "rrd-fast-artifact/1"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MAX_BATCH_SIZE = 1 << 20
MAX_FILES = 1024
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
TRUST_HINT = "pass --trust-artifact (trust=True) only if you trust everyone who can write it"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class FileRecord:
    """One file of the artifact as the sidecar pins it."""

    name: str
    batch_size: int | None  # None: serves any batch size
    sha256: str
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "batch_size": self.batch_size, "sha256": self.sha256, "bytes": self.bytes}


@dataclass(frozen=True)
class BuiltBy:
    """Who built the artifact, where and when: what to ask before trusting one that runs native code."""

    host: str
    user: str
    uid: int | None
    time: str

    @classmethod
    def here(cls) -> BuiltBy:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):  # no passwd entry and no LOGNAME/USER (some containers)
            user = f"uid {os.getuid()}"
        return cls(socket.gethostname(), user, os.getuid(),
                   _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host, "user": self.user, "uid": self.uid, "time": self.time}


@dataclass(frozen=True)
class ArtifactCard:
    """The `artifact.json` sidecar. `input`, `output` and `source` stay JSON objects (validated)."""

    backend: str
    precision: str
    device: str
    dynamic_batch: bool
    batch_sizes: tuple[int, ...]
    input: dict[str, Any]
    output: dict[str, Any]
    source: dict[str, Any]
    files: tuple[FileRecord, ...]
    versions: dict[str, Any] = field(default_factory=dict)
    device_name: str | None = None
    created: str | None = None
    built_by: BuiltBy | None = None  # absent in artifacts written before it was recorded
    calibration: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, where: str | Path = ARTIFACT_SIDECAR) -> ArtifactCard:
        """Validate every field this module reads (types, bounds, plain file names) and build the card."""
        f = JsonFields(data, where, ExportError)
        if f.raw("format") != ARTIFACT_FORMAT:
            raise f.fail("format", f.raw("format"), repr(ARTIFACT_FORMAT))
        precision = f.str("precision")
        if precision not in PRECISIONS:
            raise f.fail("precision", precision, f"one of {', '.join(PRECISIONS)}")
        device = f.str("device")
        if device not in ("cpu", "cuda"):
            raise f.fail("device", device, "cpu or cuda")
        sizes = f.list("batch_sizes", 64, min_len=1)
        for size in sizes:
            if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_BATCH_SIZE:
                raise f.fail("batch_sizes", sizes, f"a list of integers in 1..{MAX_BATCH_SIZE}")
        inp = f.object("input")
        dtype = inp.str("dtype")
        if dtype not in _DTYPES:
            raise inp.fail("dtype", dtype, f"one of {sorted(_DTYPES)}")
        shape = inp.list("shape", 4, min_len=4)
        for value, hi in zip(shape[1:], (MAX_IN_CHANNELS, MAX_IMAGE_SIZE, MAX_IMAGE_SIZE)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= hi:
                raise inp.fail("shape", shape, f"[batch, C, H, W] with C in 1..{MAX_IN_CHANNELS} "
                                               f"and H, W in 1..{MAX_IMAGE_SIZE}")
        out = f.object("output")
        out_shape = out.list("shape", 2, min_len=2)
        if isinstance(out_shape[1], bool) or not isinstance(out_shape[1], int) \
                or not 1 <= out_shape[1] <= MAX_NUM_CLASSES:
            raise out.fail("shape", out_shape, f"[batch, classes] with classes in 1..{MAX_NUM_CLASSES}")
        source = f.object("source")
        source.str("sha256", optional=True, pattern=SHA256_PATTERN, expected="64 lowercase hex digits")
        records = []
        for i, entry in enumerate(f.list("files", MAX_FILES, min_len=1)):
            e = JsonFields(entry, where, ExportError, f"files[{i}].")
            name = e.str("name", pattern=_PLAIN_NAME, expected="a plain file name inside the folder")
            if name == ARTIFACT_SIDECAR or name in {r.name for r in records}:
                raise e.fail("name", name, "a file name listed once, other than artifact.json")
            records.append(FileRecord(name, e.int("batch_size", 1, MAX_BATCH_SIZE, optional=True),
                                      e.str("sha256", pattern=SHA256_PATTERN, expected="64 lowercase hex digits"),
                                      e.int("bytes", 0)))
        built = f.object("built_by", optional=True)
        built_by = None if built is None else BuiltBy(
            built.str("host"), built.str("user"), built.int("uid", 0, optional=True), built.str("time"))
        versions = f.object("versions", optional=True)
        calibration = f.object("calibration", optional=True)
        known = {"format", "backend", "precision", "device", "dynamic_batch", "batch_sizes", "input", "output", "source",
                 "files", "versions", "device_name", "created", "built_by", "calibration"}
        return cls(
            backend=f.str("backend"), precision=precision, device=device, dynamic_batch=f.bool("dynamic_batch"),
            batch_sizes=tuple(sizes), input=dict(inp.data), output=dict(out.data), source=dict(source.data),
            files=tuple(records), versions={} if versions is None else dict(versions.data),
            device_name=f.str("device_name", optional=True, expected="a string", empty=True),
            created=f.str("created", optional=True), built_by=built_by,
            calibration=None if calibration is None else dict(calibration.data), extra=f.extras(known),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            **self.extra, "format": ARTIFACT_FORMAT, "backend": self.backend, "precision": self.precision,
            "device": self.device, "device_name": self.device_name, "dynamic_batch": self.dynamic_batch,
            "batch_sizes": list(self.batch_sizes), "input": self.input, "output": self.output, "source": self.source,
            "files": [r.to_dict() for r in self.files], "versions": self.versions, "created": self.created,
        }
        if self.built_by is not None:
            out["built_by"] = self.built_by.to_dict()
        if self.calibration is not None:
            out["calibration"] = self.calibration
        return out

    @property
    def input_spec(self) -> InputSpec:
        _, c, h, w = self.input["shape"]
        return InputSpec(int(c), int(h), int(w))

    @property
    def input_dtype(self) -> torch.dtype:
        return _DTYPES[self.input["dtype"]]

    def artifact_files(self) -> list[ArtifactFile]:
        return [ArtifactFile(r.name, r.batch_size) for r in self.files]


def read_artifact_card(folder: str | Path) -> ArtifactCard:
    """The validated sidecar of an artifact folder."""
    path = Path(folder) / ARTIFACT_SIDECAR
    if not path.is_file():
        raise ExportError(f"{path}: artifact sidecar not found (expected a folder written by `python -m export`)")
    return ArtifactCard.from_dict(read_json_object(path, ExportError), path)


def read_artifact_sidecar(folder: str | Path) -> dict[str, Any]:
    """`read_artifact_card` as a plain dict."""
    return read_artifact_card(folder).to_dict()


def verify_files(folder: Path, card: ArtifactCard) -> None:
    """Every listed file exists and still has the sha256 the sidecar recorded."""
    for record in card.files:
        path = folder / record.name
        if not path.is_file():
            raise ExportError(f"{path}: artifact file listed in {ARTIFACT_SIDECAR} is missing")
        actual = sha256_file(path)
        if actual != record.sha256:
            raise ExportError(
                f"{path}: sha256 {actual[:12]}… does not match {ARTIFACT_SIDECAR} ({record.sha256[:12]}…); "
                "the file is corrupted or was replaced, re-export it"
            )


# -- who may write the folder ------------------------------------------------------------------

def untrusted_reason(path: Path) -> str | None:
    """Why another user could have changed `path` (owner, group/world write bit), or None."""
    st = path.stat()
    if st.st_uid != os.geteuid():
        return f"is owned by uid {st.st_uid}, not by you (uid {os.geteuid()})"
    mode = stat.S_IMODE(st.st_mode)
    writers = [who for who, bit in (("group", stat.S_IWGRP), ("world", stat.S_IWOTH)) if mode & bit]
    if writers:
        return f"is {'- and '.join(writers)}-writable (mode {mode:#o})"
    return None


def check_trusted(folder: Path, card: ArtifactCard, backend: Backend) -> None:
    """Refuse an artifact of a native-code backend that someone else could have written."""
    for path in (folder, folder / ARTIFACT_SIDECAR, *(folder / r.name for r in card.files)):
        if not path.exists():
            continue  # reported by verify_files
        reason = untrusted_reason(path)
        if reason is not None:
            raise ExportError(
                f"{path}: refusing to load this {backend.name} artifact: it {reason}, and loading it runs native "
                f"code from the folder; make it writable only by you (chmod -R go-w {folder}) or {TRUST_HINT}"
            )


def restrict_to_owner(folder: Path, names: list[str]) -> None:
    """Drop group and world write permission from a freshly written artifact (a umask of 002 grants it)."""
    for path in (folder, *(folder / n for n in names)):
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            try:
                os.chmod(path, mode & ~(stat.S_IWGRP | stat.S_IWOTH))
            except PermissionError:  # someone else's folder: the loader will say so when it refuses it
                pass


def check_out_folder(out: str | Path, option: str = "--out") -> Path:
    """`out` as a folder that exists or can be created; a file in the way is a one-line error."""
    out = Path(out)
    for path in (out, *out.parents):
        if path.exists() or path.is_symlink():
            if not path.is_dir():
                where = "is a file" if path == out else f"cannot be created inside {path}, which is a file"
                raise ExportError(f"{option} {out}: {where}; expected a folder")
            break
    return out


def prepare_out_folder(out: str | Path, option: str = "--out") -> Path:
    """`check_out_folder`, then create it."""
    out = check_out_folder(out, option)
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_artifact_sidecar(out: Path, sidecar: dict[str, Any]) -> dict[str, Any]:
    """Validate the sidecar, make the folder writable only by its owner, then write `artifact.json` last."""
    card = ArtifactCard.from_dict(sidecar, out / ARTIFACT_SIDECAR)
    if card.built_by is None:
        card = replace(card, built_by=BuiltBy.here())
    restrict_to_owner(out, [r.name for r in card.files])
    data = card.to_dict()
    write_json_atomic(out / ARTIFACT_SIDECAR, data)
    restrict_to_owner(out, [ARTIFACT_SIDECAR])
    return data


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


def load_artifact(folder: str | Path, device: str | None = None, expect_source_sha: str | None = None,
                  trust: bool = False) -> Artifact:
    """Verify and load an artifact folder; `device` defaults to the one it was exported for.

    Backends whose files are native code (`Backend.loads_native_code`) are refused when
    another user could have written the folder, unless `trust`.
    """
    folder = Path(folder)
    card = read_artifact_card(folder)
    backend = get_backend(card.backend)
    device = device or card.device
    if backend.device_specific and device != card.device:
        raise ExportError(f"{folder}: this {backend.name} artifact was compiled for {card.device} and cannot run on {device}")
    source_sha = card.source.get("sha256")
    if expect_source_sha is not None and source_sha != expect_source_sha:
        raise ExportError(
            f"{folder}: exported from checkpoint sha256 {str(source_sha)[:12]}…, but the checkpoint now has "
            f"{expect_source_sha[:12]}… (re-export it)"
        )
    backend.check(card.precision, device)
    if backend.loads_native_code and not trust:
        check_trusted(folder, card, backend)
    verify_files(folder, card)
    sidecar = card.to_dict()
    try:
        runners = backend.load(folder, card.artifact_files(), sidecar, device)
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - runtimes raise their own types for unreadable files
        reason = " ".join(str(exc).split())[:300]
        raise ExportError(f"{folder}: {backend.name} cannot load this artifact ({type(exc).__name__}: {reason})") from None
    return Artifact(folder, sidecar, backend, device, card.input_spec, card.input_dtype, runners)
