"""Typed run configuration: dataclasses loaded from YAML, with `key.path=value` overrides.

Unknown keys are refused with the closest known key suggested, and every value is checked
against its field's constraint when the config is loaded, so a bad value stops the run
with its key named instead of failing epochs later. Each field carries its constraint and
a one-line doc (`meta`), from which `config_help` writes the `--help` key list. Every run
writes the resolved config next to its outputs, so a run directory is self-describing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipelines.errors import UserError, did_you_mean


class ConfigError(UserError):
    """A config file, key or value that is wrong; the message names the key."""


# ------------------------------------------------------------------ YAML

# YAML 1.1 (PyYAML) reads a float only with a dot and a signed exponent, so `1e-3` and `1.0e3`
# would be strings; YAML 1.2 reads them as numbers. Forms with a dot and a signed exponent are
# already floats under the 1.1 rule, which stays in place for `.inf`, `.nan` and `1.5`.
_SCI_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
_SCI_FIRST = list("-+.0123456789")


class YAMLTooLarge(yaml.YAMLError):
    """A document whose aliases would expand past the loader's limits (a "billion laughs" file)."""


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans (only true/false: `mixed_precision: no` stays the string 'no') and floats
    (`1e-3` is a number); aliases are counted while composing so that a few hundred bytes cannot
    expand into a structure that fills memory once the config is copied or printed."""

    max_aliases = 100
    max_nodes = 100_000

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._aliases = 0
        self._sizes: dict[int, int] = {}  # id(node) -> node count with every alias expanded

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            line = self.peek_event().start_mark.line + 1
            self._aliases += 1
            if self._aliases > self.max_aliases:
                raise YAMLTooLarge(f"more than {self.max_aliases} YAML alias references (line {line})")
            node = super().compose_node(parent, index)
            if id(node) not in self._sizes:  # the anchor is still open: the alias sits inside it
                raise YAMLTooLarge(f"a YAML alias inside its own anchor, an endlessly nested value (line {line})")
            return node
        node = super().compose_node(parent, index)
        if isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
        size = 1 + sum(self._sizes[id(child)] for child in children)
        if size > self.max_nodes:
            raise YAMLTooLarge(f"YAML aliases expand to more than {self.max_nodes} values "
                               f"(line {node.start_mark.line + 1})")
        self._sizes[id(node)] = size
        return node


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _SCI_FLOAT, _SCI_FIRST)


class _Dumper(yaml.SafeDumper):
    """Quotes every string that `_Loader` or a YAML 1.1 reader would take for another type."""


_Dumper.add_implicit_resolver("tag:yaml.org,2002:float", _SCI_FLOAT, _SCI_FIRST)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


# ------------------------------------------------------------------ field constraints

_NUMBER = r"[-+]?(?:2\*\*[0-9]+|[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?)"
_PART = re.compile(rf"\s*(?:(?P<op>>=|<=|>|<)\s*(?P<bound>{_NUMBER})"
                   rf"|(?P<open>[\[(])\s*(?P<lo>{_NUMBER})\s*,\s*(?P<hi>{_NUMBER})\s*(?P<close>[\])])"
                   r"|(?P<word>increasing))\s*(?:,|$)")
_OPS = {">": lambda v, b: v > b, ">=": lambda v, b: v >= b, "<": lambda v, b: v < b, "<=": lambda v, b: v <= b}


def _number(text: str) -> float:
    sign = -1 if text.startswith("-") else 1
    text = text.lstrip("+-")
    return sign * (2 ** int(text[3:]) if text.startswith("2**") else float(text))


@dataclass(frozen=True)
class Check:
    """A field's allowed values, written once as `--help` and error messages show them.

    `text` is comma-separated parts: `>0`, `>=0`, `<1`, intervals `(0, 1]` / `[0, 2**63)`, and
    `increasing` (a list whose items each exceed the one before). Number parts apply to a
    number or to every item of a list. Floats must be finite unless `allow_inf`; NaN never passes.
    """

    text: str = ""
    allow_inf: bool = False
    tests: tuple[tuple[str, float], ...] = ()
    increasing: bool = False

    @classmethod
    def parse(cls, text: str, allow_inf: bool = False) -> Check:
        tests: list[tuple[str, float]] = []
        increasing, pos = False, 0
        while pos < len(text):
            match = _PART.match(text, pos)
            if match is None or match.end() == pos:
                raise ValueError(f"config constraint {text!r}: cannot read {text[pos:]!r}")
            if match["op"]:
                tests.append((match["op"], _number(match["bound"])))
            elif match["open"]:
                tests.append((">=" if match["open"] == "[" else ">", _number(match["lo"])))
                tests.append(("<=" if match["close"] == "]" else "<", _number(match["hi"])))
            else:
                increasing = True
            pos = match.end()
        return cls(text, allow_inf, tuple(tests), increasing)

    def _number_fails(self, value: float) -> bool:
        if isinstance(value, float) and (math.isnan(value) or (math.isinf(value) and not self.allow_inf)):
            return True
        return not all(_OPS[op](value, bound) for op, bound in self.tests)

    def problem(self, value: Any, key: str) -> str | None:
        """None when `value` is allowed, else the one-line refusal naming key, value and constraint."""
        if isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if _is_number(item) and self._number_fails(item):
                    return f"{key}[{i}]: got {item!r}, expected {self.describe(type(item))}"
            if self.increasing and any(b <= a for a, b in zip(value, value[1:])):
                return f"{key}: got {list(value)!r}, expected {self.describe(int)} (each larger than the one before)"
            return None
        if _is_number(value) and self._number_fails(value):
            return f"{key}: got {value!r}, expected {self.describe(type(value))}"
        return None

    def describe(self, kind: type = float) -> str:
        """The constraint as shown to users; floats add `finite` unless infinity is allowed."""
        finite = "finite" if kind is float and not self.allow_inf else ""
        return ", ".join(p for p in (finite, self.text) if p)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def meta(check: str = "", doc: str = "", *, allow_inf: bool = False) -> dict[str, Any]:
    """Field metadata: the allowed values (see `Check`) and a one-line doc, both shown by `--help`."""
    return {"check": Check.parse(check, allow_inf), "doc": doc}


def _check_of(f: dataclasses.Field) -> Check:
    return f.metadata.get("check") or Check()


# ------------------------------------------------------------------ the config

@dataclass
class DataConfig:
    """The dataset, its splits, batches and training augmentation."""

    format: str = field(default="cifar100", metadata=meta("", (
        "dataset reader (pipelines.formats): cifar100, cifar10, fashion_mnist, stl10, tiny_imagenet, imagenet")))
    root: str = field(default="data", metadata=meta("", "folder holding the dataset in that format's own on-disk layout"))
    pipeline: Literal["torch", "dali", "auto"] = field(default="torch", metadata=meta("", (
        "loading backend; auto: the one `python -m rrd_fast.bench pipelines --write-auto-table` measured fastest "
        "for this kind of dataset and device")))
    batch_size: int = field(default=64, metadata=meta(">0", (
        "global training batch, summed over all processes and split evenly across them; the last partial batch "
        "of an epoch is dropped")))
    eval_batch_size: int = field(default=256, metadata=meta(">0", (
        "global evaluation batch, split across processes; the last batch may be smaller")))
    train_limit: int = field(default=0, metadata=meta(">=0", (
        "train on only the first N samples of the training split (smoke tests, demos); 0: all of it")))
    eval_limit: int = field(default=0, metadata=meta(">=0", (
        "evaluate on only the first N samples of the evaluation split; 0: all of it")))
    pad: int = field(default=4, metadata=meta(">=0", (
        "array datasets (CIFAR, Fashion-MNIST): zero padding in pixels before the random crop of the original size; "
        "file datasets take a random resized crop instead")))
    flip: bool = field(default=True, metadata=meta("", "random horizontal flip (p=0.5) of training images"))
    on_corrupt: Literal["error", "skip"] = field(default="error", metadata=meta("", (
        "file datasets: stop at an undecodable image, or skip it with a warning")))


@dataclass
class ModelConfig:
    """The network being trained: the student, or the teacher while training one."""

    arch: str = field(default="resnet8x4", metadata=meta("", (
        "model name (rrd_fast.models.list_models()), e.g. resnet8x4, wrn_16_2, vgg8, MobileNetV2, ShuffleV2")))


@dataclass
class TeacherConfig:
    """The frozen teacher a distillation method reads, and its optional feature cache."""

    arch: str = field(default="", metadata=meta("", (
        "teacher model name: required with a RepDistiller .pth, checked against model.json with a checkpoint folder")))
    checkpoint: str = field(default="", metadata=meta("", (
        "a checkpoint folder (model.safetensors + model.json) or a RepDistiller .pth")))
    eval_top1: bool = field(default=True, metadata=meta("", (
        "measure the teacher's own top-1 on the eval split before training; recorded in model.json (teacher.top1)")))
    cache: str = field(default="", metadata=meta("", (
        "teacher feature cache folder, built on first use; empty: run the teacher online every step")))
    cache_views: int = field(default=32, metadata=meta(">0", (
        "V augmented views cached per sample; epoch e replays view e mod V: more views give the student more "
        "augmentation diversity but make the cache and its build V-times larger (with V >= epochs and an fp32 "
        "cache, identical to online teaching; see rrd_fast/cache/__init__.py for fp16 and bf16)")))
    cache_dtype: Literal["fp16", "bf16", "fp32"] = field(default="fp16", metadata=meta("", (
        "storage type of the cached teacher outputs, read back as fp32: fp16 and bf16 halve the cache (bf16 keeps "
        "fp32's range with fewer mantissa bits), fp32 stores the outputs unrounded")))
    cache_precision: Literal["auto", "no", "bf16", "fp16"] = field(default="auto", metadata=meta("", (
        "teacher autocast in the build; auto: train.mixed_precision (cached == online needs the same)")))
    cache_batch_size: int = field(default=0, metadata=meta(">=0", (
        "build batch; 0: 64 on CPU, the largest that fits (from 4096 down) on CUDA")))
    cache_shard_samples: int = field(default=65536, metadata=meta(">0", (
        "samples per shard file; a killed build resumes at the first unfinished shard")))
    cache_verify: Literal["checksum", "size"] = field(default="checksum", metadata=meta("", (
        "checksum: sha256 of each shard before its first read; size: file sizes only")))
    cache_max_gb: float = field(default=32.0, metadata=meta(">0", (
        "refuse a cache whose teacher fields would need more GiB than this, checked before the build; .inf: no limit"),
        allow_inf=True))
    cache_fallback: Literal["refuse", "online"] = field(default="refuse", metadata=meta("", (
        "a cache over teacher.cache_max_gb: stop, or run the teacher online")))


@dataclass
class MethodConfig:
    """Total loss = gamma*CE + alpha*KD + beta*(the method's own term).

    A weight left unset (null) takes the authors' value for the method (`method.name=crd` gives
    gamma 1, alpha 0, beta 0.8); the run's saved config.yaml holds the resolved weights.
    `options` holds per-term settings keyed by term name, e.g. {"kd": {"T": 4}, "rrd": {"preset": "paper"}};
    each term validates its own options, so adding a method needs no change here.
    """

    name: str = field(default="vanilla", metadata=meta("", (
        "method (rrd_fast.methods.list_methods()): vanilla trains without a teacher; kd, rrd, crd, ... distill")))
    gamma: float | None = field(default=None, metadata=meta(">=0", (
        "weight of the cross-entropy with the labels; null: the method's own")))
    alpha: float | None = field(default=None, metadata=meta(">=0", (
        "weight of the KD term (KL divergence of temperature-softened logits); null: the method's own")))
    beta: float | None = field(default=None, metadata=meta(">=0", (
        "weight of the method's own term (rrd, crd, ...); null: the method's own")))
    options: dict[str, dict[str, Any]] = field(default_factory=dict, metadata=meta("", (
        "per-term settings keyed by term name, e.g. {rrd: {preset: '2025'}, kd: {T: 4}}; each term checks its own")))


@dataclass
class OptimConfig:
    """SGD with a step-decayed learning rate."""

    epochs: int = field(default=240, metadata=meta(">0", (
        "training epochs; a method's init stage (AB, FT, FSP) runs its own epochs before them")))
    lr: float = field(default=0.05, metadata=meta(">=0", (
        "learning rate at base_batch_size (CIFAR recipe: 0.05, 0.01 for MobileNetV2 and the ShuffleNets)")))
    momentum: float = field(default=0.9, metadata=meta("[0, 1)", "SGD momentum"))
    weight_decay: float = field(default=5e-4, metadata=meta(">=0", "SGD weight decay (L2 penalty)"))
    milestones: list[int] = field(default_factory=lambda: [150, 180, 210], metadata=meta(">=0, increasing", (
        "0-based epochs at which the learning rate is multiplied by lr_decay; those past optim.epochs never apply")))
    lr_decay: float = field(default=0.1, metadata=meta("(0, 1]", "factor applied to the learning rate at each milestone"))
    lr_scaling: Literal["none", "linear"] = field(default="none", metadata=meta("", (
        "linear: lr * data.batch_size / base_batch_size; none: lr as given")))
    base_batch_size: int = field(default=64, metadata=meta(">0", "batch size at which `lr` is quoted (linear scaling)"))
    nesterov: bool = field(default=False, metadata=meta("", "Nesterov momentum (needs optim.momentum > 0)"))


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

    memory_sharding: Literal["auto", "sharded", "replicated", "local"] = field(default="auto", metadata=meta("", (
        "relational memories over processes: sharded (1/N of the rows each, exact loss), replicated, or local "
        "(one unsynchronised memory each); auto: sharded with N > 1")))
    sync_batchnorm: bool = field(default=False, metadata=meta("", (
        "synchronise BatchNorm statistics across processes (GPUs only)")))


@dataclass
class TrainConfig:
    """Precision, evaluation and checkpoint cadence, and CPU threads."""

    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = field(default="no", metadata=meta("", (
        "autocast type; auto: bf16 on GPUs and on CPUs with native bf16, fp32 (no) elsewhere; the run saves what "
        "it resolved to")))
    eval_every: int = field(default=1, metadata=meta(">0", "evaluate every N epochs, and always after the last"))
    channels_last: bool = field(default=True, metadata=meta("", (
        "channels-last memory format for images and networks (faster convolutions on most hardware)")))
    progress: bool = field(default=True, metadata=meta("", "progress bars and run info lines on the main process"))
    save_every: int = field(default=1, metadata=meta(">0", (
        "write the resume checkpoint every N epochs (init-stage epochs included), and always after the last")))
    save_every_steps: int = field(default=0, metadata=meta(">=0", (
        "also write a mid-epoch resume checkpoint every N steps (0: only at epoch ends and on SIGTERM/SIGINT)")))
    threads: int = field(default=0, metadata=meta(">=0", (
        "torch CPU threads per process; 0: the cores this process may run on divided by the processes on this "
        "machine (LOCAL_WORLD_SIZE), at least 1")))
    log_with: Literal["none", "tensorboard"] = field(default="none", metadata=meta("", (
        "experiment tracker, through Accelerate's; tensorboard: scalars per epoch in RUN_DIR/tensorboard "
        "(needs the tensorboard extra)")))
    compile: Literal["off", "on", "auto"] = field(default="off", metadata=meta("", (
        "torch.compile the distillation step (student, loss terms, memories, backward), the teacher's forward "
        "and evaluation; auto: on for CUDA runs of at least 2000 training steps, off on CPUs (measured no faster "
        "there); the decision is printed")))
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = field(
        default="default", metadata=meta("", (
            "torch.compile mode; reduce-overhead (CUDA graphs) and max-autotune apply on CUDA only, CPUs use default")))
    compile_backend: Literal["inductor", "aot_eager", "eager"] = field(default="inductor", metadata=meta("", (
        "torch.compile backend; aot_eager and eager trace without generating code (for debugging graph capture)")))
    sync_every: int = field(default=20, metadata=meta(">0", (
        "read the step's losses on the host (finiteness check, progress) every N steps, so the step itself "
        "never waits for the device")))


@dataclass
class RunConfig:
    """One run: where its folder goes, its seed, and every section below."""

    name: str = field(default="", metadata=meta("", (
        "run folder under output_dir; empty: <teacher>_<student>_<method>_seed<N>")))
    output_dir: str = field(default="runs", metadata=meta("", "folder holding the run folders"))
    seed: int = field(default=0, metadata=meta("[0, 2**63)", (
        "seed of weight initialisation, sample order, augmentation and memory initialisation")))
    data: DataConfig = field(default_factory=DataConfig, metadata=meta("", DataConfig.__doc__ or ""))
    student: ModelConfig = field(default_factory=ModelConfig, metadata=meta("", ModelConfig.__doc__ or ""))
    teacher: TeacherConfig = field(default_factory=TeacherConfig, metadata=meta("", TeacherConfig.__doc__ or ""))
    method: MethodConfig = field(default_factory=MethodConfig, metadata=meta("", (
        "Total loss = gamma*CE + alpha*KD + beta*(the method's own term); unset weights take the method's own.")))
    optim: OptimConfig = field(default_factory=OptimConfig, metadata=meta("", OptimConfig.__doc__ or ""))
    distributed: DistributedConfig = field(default_factory=DistributedConfig, metadata=meta("", (
        "How several processes share a run.")))
    train: TrainConfig = field(default_factory=TrainConfig, metadata=meta("", TrainConfig.__doc__ or ""))

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


# ------------------------------------------------------------------ building and checking

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


def check_config(cfg: Any, prefix: str = "") -> None:
    """Refuse any value outside its field's constraint (`meta`), naming key, value and constraint."""
    for f in dataclasses.fields(cfg):
        key = f"{prefix}.{f.name}" if prefix else f.name
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_config(value, key)
            continue
        problem = _check_of(f).problem(value, key)
        if problem is not None:
            raise ConfigError(problem)
    if isinstance(cfg, OptimConfig) and cfg.nesterov and cfg.momentum == 0:
        raise ConfigError(f"{prefix}.nesterov: true needs {prefix}.momentum > 0 (got 0)")


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
    except YAMLTooLarge as exc:
        raise ConfigError(f"override {key.strip()}: {exc}") from None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def read_yaml_mapping(path: str | Path, what: str = "config file", error: type[ConfigError] = ConfigError
                      ) -> dict[str, Any]:
    """A YAML file's top-level mapping ({} when empty), with the run configs' YAML rules and alias limits."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} not found")
    try:
        loaded = _yaml(path.read_text())
    except YAMLTooLarge as exc:
        raise error(f"{path}: {exc}; refusing a file that would expand that far") from None
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise error(f"{path}: expected a mapping at the top level")
    return dict(loaded or {})


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read YAML (optional), apply `key=value` overrides, build the typed config and check every value."""
    tree = read_yaml_mapping(path) if path is not None else {}
    for text in overrides or []:
        key, value = parse_override(text)
        _set_path(tree, key, value)
    cfg = _build(RunConfig, tree)
    check_config(cfg)
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


def dump_config(cfg: RunConfig) -> str:
    """The config as YAML that `load_config` reads back to an equal config."""
    return yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    from rrd_fast.atomic import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(dump_config(cfg))


# ------------------------------------------------------------------ --help

def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return "|".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(hint))
    if origin in (list, tuple):
        return f"list[{_type_name(typing.get_args(hint)[0])}]"
    if origin is dict or hint is dict:
        return "mapping"
    return getattr(hint, "__name__", str(hint))


def _number_kind(hint: Any) -> type | None:
    """int or float for a numeric field (also inside Optional or list), else None."""
    if hint in (int, float):
        return hint
    if typing.get_origin(hint) in (list, tuple, typing.Union, types.UnionType):
        kinds = {_number_kind(a) for a in typing.get_args(hint) if a is not type(None)}
        return kinds.pop() if len(kinds) == 1 else None
    return None


def _default_of(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return f.default


def config_help(width: int | None = None) -> str:
    """Every section and key with its type, default, constraint and doc, from the dataclasses."""
    width = width or min(shutil.get_terminal_size((100, 24)).columns, 120)
    lines = ["config keys (override with key.path=value; a --config YAML file nests the same keys):"]

    def describe(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(hints[f.name]):
                continue
            hint = hints[f.name]
            kind = _number_kind(hint)
            allowed = _check_of(f).describe(kind) if kind is not None else ""
            head = f"  {key}: {_type_name(hint)} = {json.dumps(_default_of(f))}" + (f"   allowed: {allowed}" if allowed else "")
            lines.append(head)
            lines.extend(textwrap.wrap(f.metadata.get("doc", ""), width, initial_indent=" " * 6,
                                       subsequent_indent=" " * 6))
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                lines.append("")
                lines.append(f"{f.name}: {f.metadata.get('doc', '').splitlines()[0]}")
                describe(hints[f.name], f"{prefix}{f.name}.")

    describe(RunConfig, "")
    return "\n".join(lines)
