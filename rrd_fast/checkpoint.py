"""Model checkpoints as `model.safetensors` plus a `model.json` sidecar.

The sidecar carries everything needed to rebuild and trust the model without any
training code: architecture, class count, input normalisation and the weights' sha256.
`ModelCard` is the sidecar's one schema: the trainer, the teacher importer and export
write it, and every reader validates a file against it before using any value, so a
wrong type, a missing field or an absurd size is one line naming the file and field,
never a traceback or a huge allocation.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipelines.errors import UserError, did_you_mean, first_line
from rrd_fast.atomic import atomic_path, read_json_object, write_json_atomic
from rrd_fast.models import create_model, list_models
from rrd_fast.models.registry import MODELS

WEIGHTS_NAME = "model.safetensors"
SIDECAR_NAME = "model.json"
SIDECAR_FORMAT = "rrd-fast-model/1"

# What a sidecar may ask the loader to build: far above every dataset here (ImageNet-21k has
# about 22k classes), far below what would exhaust memory before the weights are even read.
MAX_NUM_CLASSES = 100_000
MAX_IN_CHANNELS = 64
MAX_IMAGE_SIZE = 4096

SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt, or does not match what was asked for."""


# -- typed reads of JSON objects ---------------------------------------------------------------

_ABSENT: Any = object()


def _show(value: Any) -> str:
    text = repr(value)
    return f"{text[:40]}… ({type(value).__name__})" if len(text) > 40 else f"{text} ({type(value).__name__})"


class JsonFields:
    """Typed, bounded reads of one JSON object's fields.

    Each failure raises `error` with one line that names the file, the field (dotted for
    nested objects) and what was expected. Shared by the model, artifact and cache schemas.
    """

    def __init__(self, data: Any, where: str | Path, error: Callable[[str], Exception], prefix: str = "") -> None:
        self.where, self.error, self.prefix = str(where), error, prefix
        if not isinstance(data, Mapping):
            label = f"field {prefix.rstrip('.')!r}" if prefix else "the file"
            raise error(f"{self.where}: {label} is {_show(data)}, expected a JSON object")
        self.data = data

    def fail(self, key: str, value: Any, expected: str) -> Exception:
        return self.error(f"{self.where}: field {self.prefix + key!r} is {_show(value)}, expected {expected}")

    def _get(self, key: str, optional: bool, expected: str) -> Any:
        value = self.data.get(key, _ABSENT)
        if value is _ABSENT or value is None:
            if optional:
                return _ABSENT
            if value is _ABSENT:
                raise self.error(f"{self.where}: field {self.prefix + key!r} is missing, expected {expected}")
            raise self.fail(key, value, expected)
        return value

    def int(self, key: str, lo: int, hi: int | None = None, optional: bool = False) -> Any:
        expected = f"an integer in {lo}..{hi}" if hi is not None else f"an integer >= {lo}"
        value = self._get(key, optional, expected)
        if value is _ABSENT:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
            raise self.fail(key, value, expected)
        return value

    def number(self, key: str, lo: float = -math.inf, hi: float = math.inf, optional: bool = False) -> Any:
        expected = "a finite number" + (f" in {lo:g}..{hi:g}" if math.isfinite(lo) or math.isfinite(hi) else "")
        value = self._get(key, optional, expected)
        if value is _ABSENT:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not lo <= value <= hi:
            raise self.fail(key, value, expected)
        return float(value)

    def str(self, key: str, optional: bool = False, pattern: re.Pattern[str] | None = None,
            expected: str = "a non-empty string", empty: bool = False) -> Any:
        value = self._get(key, optional, expected)
        if value is _ABSENT:
            return None
        if not isinstance(value, str) or (not value and not empty) \
                or (pattern is not None and not pattern.fullmatch(value)):
            raise self.fail(key, value, expected)
        return value

    def bool(self, key: str, optional: bool = False) -> Any:
        value = self._get(key, optional, "true or false")
        if value is _ABSENT:
            return None
        if not isinstance(value, bool):
            raise self.fail(key, value, "true or false")
        return value

    def object(self, key: str, optional: bool = False) -> Any:
        """The nested object as JsonFields (field names prefixed `key.`); None when optional and absent."""
        value = self._get(key, optional, "a JSON object")
        if value is _ABSENT:
            return None
        if not isinstance(value, Mapping):
            raise self.fail(key, value, "a JSON object")
        return JsonFields(value, self.where, self.error, f"{self.prefix}{key}.")

    def list(self, key: str, max_len: int, optional: bool = False, min_len: int = 0) -> Any:
        expected = f"a list of {min_len}..{max_len} entries"
        value = self._get(key, optional, expected)
        if value is _ABSENT:
            return None
        if not isinstance(value, list) or not min_len <= len(value) <= max_len:
            raise self.fail(key, value, expected)
        return value

    def numbers(self, key: str, lengths: tuple[int, ...], lo: float, hi: float, exclusive_lo: bool = False,
                what: str = "") -> list[float]:
        """A list of finite numbers within [lo, hi] (lo excluded with `exclusive_lo`) whose length is one of `lengths`."""
        bound = f"{'>' if exclusive_lo else '>='} {lo:g} and <= {hi:g}"
        count = " or ".join(map(str, sorted(set(lengths))))
        expected = f"a list of {count} number{'' if count == '1' else 's'}{what}, each {bound}"
        value = self._get(key, False, expected)
        if not isinstance(value, list) or len(value) not in lengths:
            raise self.fail(key, value, expected)
        for item in value:
            if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item) \
                    or not (item > lo if exclusive_lo else item >= lo) or item > hi:
                raise self.fail(key, value, expected)
        return [float(v) for v in value]

    def raw(self, key: str) -> Any:
        return self.data.get(key)

    def extras(self, known: set[str]) -> dict[str, Any]:
        """Fields this schema does not know, kept as they are so a round trip loses nothing."""
        return {k: v for k, v in self.data.items() if k not in known}


# -- the model.json schema ---------------------------------------------------------------------

@dataclass(frozen=True)
class Normalization:
    """Per-channel input normalisation: pixels scaled to [0, 1], then (x - mean) / std."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}


@dataclass(frozen=True)
class ModelCard:
    """The `model.json` sidecar: what to build, what it takes as input, where it came from.

    The first five fields rebuild the model; the rest is provenance that readers may show
    but never need. `sha256` pins the weights file and is filled in when the weights are
    written. Fields this schema does not name stay in `extra` and are written back.
    """

    arch: str
    num_classes: int
    in_channels: int
    image_size: int
    normalization: Normalization
    dataset: dict[str, Any] | None = None  # {"format": str, "root": str (optional)}
    method: dict[str, Any] | str | None = None  # trainer: {"name", "gamma", "alpha", "beta", "options"}
    teacher: dict[str, Any] | None = None
    source: dict[str, Any] | None = None  # imported teachers: {"path", "sha256"}
    seed: int | None = None
    epochs_trained: int | None = None
    init_epochs_trained: int | None = None
    top1_final: float | None = None
    top1_best: float | None = None
    best_epoch: int | None = None
    sha256: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, where: str | Path = SIDECAR_NAME) -> ModelCard:
        """Validate a sidecar dict (types, bounds, a known architecture) and build the card.

        `where` names the file in error messages. A `format` other than this version's is
        refused; a missing one is accepted (dicts handed to `write_model_checkpoint`).
        """
        f = JsonFields(data, where, CheckpointError)
        fmt = f.raw("format")
        if fmt is not None and fmt != SIDECAR_FORMAT:
            raise f.fail("format", fmt, repr(SIDECAR_FORMAT))
        arch = f.str("arch", expected="a model name (e.g. resnet8)")
        if arch not in MODELS:
            raise CheckpointError(f"{f.where}: field 'arch' is {arch!r}, not a model of the zoo"
                                  f"{did_you_mean(arch, list_models())}")
        channels = f.int("in_channels", 1, MAX_IN_CHANNELS)
        norm = f.object("normalization")
        per_channel = " (one for all channels or one per input channel)"
        normalization = Normalization(tuple(norm.numbers("mean", (1, channels), -1e3, 1e3, what=per_channel)),
                                      tuple(norm.numbers("std", (1, channels), 0.0, 1e3, exclusive_lo=True,
                                                         what=per_channel)))
        dataset = f.object("dataset", optional=True)
        if dataset is not None:
            dataset.str("format")
            dataset.str("root", optional=True, expected="a string", empty=True)
        method = f.raw("method")
        if isinstance(method, Mapping):
            f.object("method").str("name")
        elif method is not None and not isinstance(method, str):
            raise f.fail("method", method, "a method record (object) or name (string)")
        for name in ("teacher", "source"):
            f.object(name, optional=True)
        return cls(
            arch=arch,
            num_classes=f.int("num_classes", 1, MAX_NUM_CLASSES),
            in_channels=channels,
            image_size=f.int("image_size", 1, MAX_IMAGE_SIZE),
            normalization=normalization,
            dataset=_plain(f.raw("dataset")),
            method=_plain(method),
            teacher=_plain(f.raw("teacher")),
            source=_plain(f.raw("source")),
            seed=f.int("seed", -(2**63), 2**64 - 1, optional=True),
            epochs_trained=f.int("epochs_trained", 0, optional=True),
            init_epochs_trained=f.int("init_epochs_trained", 0, optional=True),
            top1_final=f.number("top1_final", 0.0, 100.0, optional=True),
            top1_best=f.number("top1_best", 0.0, 100.0, optional=True),
            best_epoch=f.int("best_epoch", 0, optional=True),
            sha256=f.str("sha256", optional=True, pattern=SHA256_PATTERN, expected="64 lowercase hex digits"),
            extra=_plain(f.extras({"format", "arch", "num_classes", "in_channels", "image_size", "normalization",
                                   *_OPTIONAL})),
        )

    def to_dict(self) -> dict[str, Any]:
        """The sidecar as JSON data, every field of the schema present (null where unknown)."""
        out = {**_plain(self.extra), "format": SIDECAR_FORMAT, "arch": self.arch, "num_classes": self.num_classes,
               "in_channels": self.in_channels, "image_size": self.image_size,
               "normalization": self.normalization.to_dict()}
        for name in _OPTIONAL:
            out[name] = _plain(getattr(self, name))
        return out

    def essentials(self) -> ModelCard:
        """Only what rebuilds the model (for copies such as the eager export artifact)."""
        return ModelCard(self.arch, self.num_classes, self.in_channels, self.image_size, self.normalization)


_OPTIONAL = ("dataset", "method", "teacher", "source", "seed", "epochs_trained", "init_epochs_trained",
             "top1_final", "top1_best", "best_epoch", "sha256")


def _plain(value: Any) -> Any:
    """A deep copy made of plain dicts and lists, so a card never shares mutable state with its source."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# -- reading and writing checkpoints -----------------------------------------------------------

def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def state_dict_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies; safetensors refuses shared or strided storage."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def write_model_checkpoint(out_dir: str | Path, model: nn.Module, sidecar: ModelCard | Mapping[str, Any]) -> dict[str, Any]:
    """Write weights then sidecar, each atomically; the sidecar's sha256 pins the weights file.

    `sidecar` is a ModelCard or the same fields as a dict; either is validated first (a card
    built directly has not been), so a bad value never reaches disk. Returns the sidecar as written.
    """
    out_dir = Path(out_dir)
    data = sidecar.to_dict() if isinstance(sidecar, ModelCard) else sidecar
    card = ModelCard.from_dict(data, out_dir / SIDECAR_NAME)
    with atomic_path(out_dir / WEIGHTS_NAME) as tmp:
        save_file(state_dict_for_saving(model), str(tmp), metadata={"format": SIDECAR_FORMAT})
    full = replace(card, sha256=sha256_file(out_dir / WEIGHTS_NAME)).to_dict()
    write_json_atomic(out_dir / SIDECAR_NAME, full)
    return full


def read_model_card(ckpt_dir: str | Path) -> ModelCard:
    """The validated sidecar of a checkpoint folder; it must name the weights' sha256."""
    path = Path(ckpt_dir) / SIDECAR_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: model sidecar not found (expected a run or checkpoint folder)")
    data = read_json_object(path, CheckpointError)
    if data.get("format") != SIDECAR_FORMAT:
        raise CheckpointError(f"{path}: field 'format' is {data.get('format')!r}, expected {SIDECAR_FORMAT!r}")
    card = ModelCard.from_dict(data, path)
    if card.sha256 is None:
        raise CheckpointError(f"{path}: field 'sha256' is missing, expected the weights file's sha256")
    return card


def read_sidecar(ckpt_dir: str | Path) -> dict[str, Any]:
    """`read_model_card` as a plain dict (every schema field present)."""
    return read_model_card(ckpt_dir).to_dict()


def read_model_checkpoint(ckpt_dir: str | Path, verify_sha: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from its validated sidecar and load the weights strictly (CPU, eval mode)."""
    ckpt_dir = Path(ckpt_dir)
    card = read_model_card(ckpt_dir)
    weights = ckpt_dir / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{weights}: weights file not found")
    if verify_sha:
        actual = sha256_file(weights)
        if actual != card.sha256:
            raise CheckpointError(f"{weights}: sha256 {actual[:12]}… does not match sidecar {str(card.sha256)[:12]}…")
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{weights}: cannot read safetensors file ({' '.join(str(exc).split())[:200]})") from None
    model = create_model(card.arch, num_classes=card.num_classes, in_channels=card.in_channels)
    load_state_strict(model, state, str(weights), card.arch)
    model.eval()
    return model, card.to_dict()


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


def read_repdistiller_state(path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a `{'model': state_dict}` file, read without running any pickled code."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refusals and corrupt zips raise assorted types
        raise CheckpointError(f"{path}: cannot read as a weights-only torch checkpoint ({first_line(exc)})") from None
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
