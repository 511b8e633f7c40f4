"""Typed run configuration: dataclasses loaded from YAML, with `key.path=value` overrides.

Unknown keys are refused with the closest known key suggested; every run writes the
resolved config next to its outputs, so a run directory is self-describing.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipelines.errors import UserError, did_you_mean


class ConfigError(UserError):
    """A config file, key or value that is wrong; the message names the key."""


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false, so `mixed_precision: no` stays the string 'no'."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


@dataclass
class DataConfig:
    format: str = "cifar100"
    root: str = "data"
    pipeline: Literal["torch", "dali", "auto"] = "torch"
    batch_size: int = 64  # global: summed over all processes
    eval_batch_size: int = 256
    train_limit: int = 0  # >0: use only the first N training samples (smoke tests, demos)
    eval_limit: int = 0
    pad: int = 4
    flip: bool = True
    on_corrupt: Literal["error", "skip"] = "error"  # file datasets: stop at an undecodable image, or skip it with a warning


@dataclass
class ModelConfig:
    arch: str = "resnet8x4"


@dataclass
class TeacherConfig:
    arch: str = ""
    checkpoint: str = ""  # a checkpoint folder (model.safetensors + model.json) or a RepDistiller .pth
    cache: str = ""  # teacher feature cache folder; empty: run the teacher online
    cache_views: int = 32  # V: epoch e replays augmentation view e mod V (see rrd_fast/cache/__init__.py)
    cache_dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    # teacher autocast in the build; auto: train.mixed_precision (cached == online needs the same)
    cache_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    cache_batch_size: int = 0  # build batch; 0: 256 on CPU, the largest that fits (from 4096 down) on CUDA
    cache_shard_samples: int = 65536  # samples per shard file
    cache_verify: Literal["checksum", "size"] = "checksum"  # checksum: sha256 of each shard before its first read
    cache_max_gb: float = 32.0  # refuse a cache whose declared teacher fields would need more (GiB)
    cache_fallback: Literal["refuse", "online"] = "refuse"  # a cache too large: stop, or run the teacher online


@dataclass
class MethodConfig:
    """Total loss = gamma*CE + alpha*KD + beta*(the method's own term).

    A weight left unset (null) takes the authors' value for the method (`method.name=crd` gives
    gamma 1, alpha 0, beta 0.8); the run's saved config.yaml holds the resolved weights.
    `options` holds per-term settings keyed by term name, e.g. {"kd": {"T": 4}, "rrd": {"preset": "paper"}};
    each term validates its own options, so adding a method needs no change here.
    """

    name: str = "vanilla"
    gamma: float | None = None
    alpha: float | None = None
    beta: float | None = None
    options: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class OptimConfig:
    epochs: int = 240
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: list[int] = field(default_factory=lambda: [150, 180, 210])
    lr_decay: float = 0.1
    lr_scaling: Literal["none", "linear"] = "none"
    base_batch_size: int = 64  # batch size at which `lr` is quoted (used by linear scaling)
    nesterov: bool = False


@dataclass
class DistributedConfig:
    """How several processes share a run (launch with `accelerate launch --multi_gpu --num_processes N`).

    `data.batch_size` is the global batch, split evenly over the processes; `optim.lr_scaling`
    says how the learning rate follows it. `memory_sharding` splits relational memories:
    `sharded` (each process holds 1/N of the rows, the loss exact over all of them; the
    default with N > 1), `replicated` (every process holds all rows, fed the gathered global
    batch), `local` (one unsynchronised memory per process, as the reference code under DDP;
    the default with one process, where all three are the same). `sync_batchnorm` needs GPUs.
    """

    memory_sharding: Literal["auto", "sharded", "replicated", "local"] = "auto"
    sync_batchnorm: bool = False


@dataclass
class TrainConfig:
    # auto: bf16 on GPUs and on CPUs with native bf16, fp32 ("no") elsewhere; the run saves what it resolved to
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "no"
    eval_every: int = 1
    channels_last: bool = True
    progress: bool = True
    save_every: int = 1  # epochs between resume checkpoints


@dataclass
class RunConfig:
    name: str = ""  # run folder under output_dir; empty: named after teacher, student, method and seed
    output_dir: str = "runs"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _build(hint, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1]
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(hint)):
            return None
        return _coerce(value, args[0], key) if len(args) == 1 else value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            hint = did_you_mean(str(key), names, prefix + "." if prefix else "")
            raise ConfigError(f"unknown config key '{full}'{hint}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    try:
        value = _yaml(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read YAML (optional), apply `key=value` overrides, and build the typed config."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = _yaml(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        tree = loaded or {}
    for text in overrides or []:
        key, value = parse_override(text)
        _set_path(tree, key, value)
    cfg = _build(RunConfig, tree)
    if not cfg.name:
        cfg.name = default_run_name(cfg)
    return cfg


def default_run_name(cfg: RunConfig) -> str:
    """`<teacher>_<student>_<method>_seed<N>` (`<student>_vanilla_seed<N>` without a teacher), so that two
    different runs of one config do not share a folder by default."""
    teacher = cfg.teacher.arch or (Path(cfg.teacher.checkpoint).stem if cfg.teacher.checkpoint else "")
    parts = [teacher] if teacher and cfg.method.name != "vanilla" else []
    return "_".join([*parts, cfg.student.arch, cfg.method.name, f"seed{cfg.seed}"])


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    from rrd_fast.atomic import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
