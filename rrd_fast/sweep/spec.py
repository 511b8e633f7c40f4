"""The sweep file: typed dataclasses loaded from YAML and checked before any run starts.

A sweep names teacher/student pairs, methods, seeds and the overrides every run shares:

    name: cifar100_paper
    output_dir: runs/cifar100          # every run folder and the report go here
    config_dir: configs/cifar100       # <teacher>_<student>.yaml and <arch>_vanilla.yaml
    pairs: [resnet32x4_resnet8x4, {teacher: resnet8, student: resnet8, config: base.yaml}]
    methods: all                       # or a list; vanilla is the student baseline, not a method
    seeds: 3                           # or a list of seeds
    overrides: [optim.epochs=240]      # or a mapping {optim: {epochs: 240}}
    transfer:                          # optional: linear probes of the finished runs (the paper's transfer table)
      datasets: {stl10: data/stl10, tiny_imagenet: data/tiny-imagenet-200}
      bn: train                        # or eval (see rrd_fast.transfer)
      pairs: [wrn_40_2_wrn_16_2]       # optional subset; default every pair
      methods: [vanilla, kd, rrd]      # optional subset of the sweep's methods (vanilla: the students alone)
      teacher: true                    # also probe each teacher the sweep trains (the table's Teacher row)
      overrides: [epochs=120]          # probe config keys (rrd_fast/transfer/config.py)

Paths are relative to the current directory, as in run configs. Every mistake is a
one-line `SweepError` naming the file and the field, raised before anything is trained.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipelines.errors import did_you_mean
from rrd_fast.config import ConfigError
from rrd_fast.config import _build as build_typed  # the run configs' typed loader, reused for one set of rules
from rrd_fast.config import read_yaml_mapping

DEFAULT_SEEDS = 3


class SweepError(ConfigError):
    """A sweep file, field or command-line selection that is wrong; the message names it."""


@dataclass
class PairSpec:
    """One teacher -> student pair. `name` is `<teacher>_<student>` unless given."""

    name: str = ""
    teacher: str = ""
    student: str = ""
    config: str = ""  # the distillation runs' config; "" with no config_dir: built-in defaults
    teacher_config: str = ""  # the teacher run's config; "": derived (see `resolve_pairs`)
    student_config: str = ""  # the student-alone runs' config; "": derived
    teacher_checkpoint: str = ""  # import this teacher (run folder or RepDistiller .pth) instead of training one
    teacher_min_top1: float | str | None = None  # overrides the sweep's threshold for this pair
    published: str = ""  # the pair's key in the published table; "": its name


@dataclass
class ExcludeSpec:
    """Cells of the grid not to run, e.g. a method the pair's channel counts do not allow."""

    pair: str = "*"
    method: str = "*"
    reason: str = ""


@dataclass
class SlurmSpec:
    """submitit's Slurm parameters: one job per run, submitted as job arrays."""

    partition: str = ""
    timeout_min: int = 4320
    gpus_per_node: int = 1
    cpus_per_task: int = 8
    mem_gb: float = 32.0
    array_parallelism: int = 256
    additional_parameters: dict[str, Any] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)  # shell lines run before each job, e.g. activating the venv


@dataclass
class TransferSpec:
    """Linear probes of the sweep's finished runs on STL-10 / Tiny-ImageNet (`rrd_fast.transfer`)."""

    datasets: dict[str, str] = field(default_factory=dict)  # dataset -> its folder, as --root takes it
    bn: Literal["train", "eval"] = "train"  # BatchNorm mode while probing; the report says which
    pairs: list[str] | None = None  # None: every pair
    methods: list[str] | None = None  # None ("all"): the students alone and every method of the sweep
    teacher: bool = True  # also probe each teacher the sweep trains (an imported teacher is not probed)
    overrides: list[str] = field(default_factory=list)  # probe config `key=value`, every probe


# Probe config keys the transfer section itself sets; overrides may not repeat them.
TRANSFER_OWN_KEYS = {"dataset": "transfer.datasets", "root": "transfer.datasets", "bn": "transfer.bn"}


@dataclass
class SweepSpec:
    name: str = ""
    output_dir: str = ""
    config_dir: str | None = "configs/cifar100"
    pairs: list[PairSpec] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: list(range(DEFAULT_SEEDS)))
    student_baseline: bool = True  # also train each student alone (method vanilla), once per seed
    teacher_seed: int = 0
    teacher_min_top1: float | str | None = None  # a number, "published" or "published - X"
    teacher_cache: str = ""  # root for per-teacher, per-seed teacher.cache folders; "": teachers run online
    overrides: list[str] = field(default_factory=list)  # every run
    teacher_overrides: list[str] = field(default_factory=list)  # teacher runs, after `overrides`
    method_overrides: dict[str, list[str]] = field(default_factory=dict)  # runs of one method (vanilla: students alone)
    exclude: list[ExcludeSpec] = field(default_factory=list)
    published: str | None = "cifar100"  # a bundled table, a file of that format, or null
    slurm: SlurmSpec = field(default_factory=SlurmSpec)
    transfer: TransferSpec | None = None  # linear probes after the student runs
    source: str = ""  # the file this came from (set by the loader)

    @property
    def sweep_dir(self) -> Path:
        return Path(self.output_dir)

    def excluded(self, pair: str, method: str) -> ExcludeSpec | None:
        for rule in self.exclude:
            if rule.pair in ("*", pair) and rule.method in ("*", method):
                return rule
        return None


@dataclass(frozen=True)
class Threshold:
    """teacher_min_top1 resolved for one pair."""

    value: float
    text: str  # how it was derived, for the refusal message


_RELATIVE = re.compile(r"^published\s*(?:-\s*(\d+(?:\.\d+)?))?$")


def parse_threshold(raw: float | str | None, published: float | None, where: str) -> Threshold | None:
    """A number, or `published [- X]` against the pair's published teacher top-1."""
    if raw is None:
        return None
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return Threshold(float(raw), f"teacher_min_top1 {float(raw):g}")
    match = _RELATIVE.match(str(raw).strip())
    if not match:
        raise SweepError(f"{where}: expected a number, 'published' or 'published - X', got {raw!r}")
    if published is None:
        raise SweepError(f"{where}: {raw!r} needs the pair's published teacher top-1, and the published table has none")
    margin = float(match.group(1) or 0.0)
    return Threshold(published - margin, f"published {published:g} - {margin:g}")


def overrides_list(value: Any, where: str) -> list[str]:
    """`key=value` strings from a list of them or a nested mapping (flattened to dotted keys)."""
    if value is None:
        return []
    if isinstance(value, list):
        bad = [v for v in value if not isinstance(v, str) or "=" not in v]
        if bad:
            raise SweepError(f"{where}: expected key.path=value strings, got {bad[0]!r}")
        return list(value)
    if isinstance(value, dict):
        out: list[str] = []

        def walk(node: dict[str, Any], prefix: str) -> None:
            for key, item in node.items():
                dotted = f"{prefix}{key}"
                if isinstance(item, dict) and item:
                    walk(item, dotted + ".")
                else:
                    out.append(f"{dotted}={json.dumps(item)}")  # JSON is YAML: the value reads back as written

        walk(value, "")
        return out
    raise SweepError(f"{where}: expected a list of key=value strings or a mapping, got {value!r}")


def _normalise(tree: dict[str, Any], where: str) -> dict[str, Any]:
    """Shorthands to the typed layout: pair names, `methods: all`, a seed count, mapping overrides."""
    tree = dict(tree)
    if "source" in tree:
        raise SweepError(f"{where}: unknown key 'source'")
    pairs = tree.get("pairs", [])
    if not isinstance(pairs, list):
        raise SweepError(f"{where}: pairs: expected a list of pair names or mappings, got {pairs!r}")
    tree["pairs"] = [{"name": p} if isinstance(p, str) else p for p in pairs]
    if tree.get("methods") == "all":
        from rrd_fast.methods import list_methods

        tree["methods"] = [m for m in list_methods() if m != "vanilla"]
    seeds = tree.get("seeds", DEFAULT_SEEDS)
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            raise SweepError(f"{where}: seeds: expected at least one seed, got {seeds}")
        seeds = list(range(seeds))
    tree["seeds"] = seeds
    for key in ("overrides", "teacher_overrides"):
        if key in tree:
            tree[key] = overrides_list(tree[key], f"{where}: {key}")
    if isinstance(tree.get("method_overrides"), dict):
        tree["method_overrides"] = {m: overrides_list(v, f"{where}: method_overrides.{m}")
                                    for m, v in tree["method_overrides"].items()}
    if isinstance(tree.get("transfer"), dict):
        transfer = dict(tree["transfer"])
        if transfer.get("methods") == "all":
            transfer["methods"] = None
        if "overrides" in transfer:
            transfer["overrides"] = overrides_list(transfer["overrides"], f"{where}: transfer.overrides")
        tree["transfer"] = transfer
    return tree


def parse_sweep(tree: Any, source: str | Path) -> SweepSpec:
    """Build and check a SweepSpec from a parsed YAML mapping."""
    where = str(source)
    if not isinstance(tree, dict):
        raise SweepError(f"{where}: expected a mapping at the top level")
    try:
        spec = build_typed(SweepSpec, _normalise(tree, where))
    except SweepError:
        raise
    except ConfigError as exc:
        raise SweepError(f"{where}: {str(exc).replace('config key', 'sweep key')}") from None
    spec.source = where
    check_sweep(spec)
    return spec


def load_sweep(path: str | Path) -> SweepSpec:
    path = Path(path)
    return parse_sweep(read_yaml_mapping(path, "sweep file", SweepError), path)


def check_sweep(spec: SweepSpec) -> None:
    """Everything that can be checked from the file alone: names, seeds, pairs, files."""
    from rrd_fast.methods import list_methods

    where = spec.source
    if not spec.name:
        raise SweepError(f"{where}: name: required (the sweep's name, used in the report)")
    if not spec.output_dir:
        raise SweepError(f"{where}: output_dir: required (the folder for the runs and the report)")
    if not spec.pairs:
        raise SweepError(f"{where}: pairs: expected at least one teacher/student pair")
    if not spec.seeds:
        raise SweepError(f"{where}: seeds: empty; give a list of seeds or their number (default {DEFAULT_SEEDS})")
    if len(set(spec.seeds)) != len(spec.seeds):
        raise SweepError(f"{where}: seeds: {spec.seeds} repeats a seed")
    known = list_methods()
    if not spec.methods and not spec.student_baseline:
        raise SweepError(f"{where}: methods: expected at least one method (or student_baseline: true)")
    for i, method in enumerate(spec.methods):
        if method == "vanilla":
            raise SweepError(f"{where}: methods[{i}]: vanilla is the student baseline; set student_baseline: true")
        if method not in known:
            raise SweepError(f"{where}: methods[{i}]: unknown method {method!r}{did_you_mean(method, known)} "
                             f"(known: {', '.join(m for m in known if m != 'vanilla')})")
    if len(set(spec.methods)) != len(spec.methods):
        raise SweepError(f"{where}: methods: {spec.methods} repeats a method")
    for method in spec.method_overrides:
        if method not in known:
            raise SweepError(f"{where}: method_overrides.{method}: unknown method{did_you_mean(method, known)}")
    resolve_pairs(spec)
    names = [p.name for p in spec.pairs]
    for i, rule in enumerate(spec.exclude):
        if rule.pair != "*" and rule.pair not in names:
            raise SweepError(f"{where}: exclude[{i}].pair: {rule.pair!r} is not a pair of this sweep{did_you_mean(rule.pair, names)}")
        if rule.method != "*" and rule.method not in known:
            raise SweepError(f"{where}: exclude[{i}].method: unknown method {rule.method!r}{did_you_mean(rule.method, known)}")
    check_transfer(spec)
    table = published_table(spec)
    for i, pair in enumerate(spec.pairs):
        teacher_pub = table.teacher(pair.published) if table else None
        raw = pair.teacher_min_top1 if pair.teacher_min_top1 is not None else spec.teacher_min_top1
        field_name = f"pairs[{i}].teacher_min_top1" if pair.teacher_min_top1 is not None else "teacher_min_top1"
        parse_threshold(raw, teacher_pub.top1 if teacher_pub else None, f"{where}: {field_name} (pair {pair.name})")


def transfer_datasets() -> list[str]:
    """The data sets a probe can target (the probe config's `dataset` choices)."""
    import typing

    from rrd_fast.transfer.config import ProbeConfig

    return list(typing.get_args(typing.get_type_hints(ProbeConfig)["dataset"]))


def transfer_methods(spec: SweepSpec) -> list[str]:
    """The methods whose runs are probed: the section's list, or the students alone and every sweep method."""
    if spec.transfer is None:
        return []
    if spec.transfer.methods is not None:
        return list(spec.transfer.methods)
    return (["vanilla"] if spec.student_baseline else []) + list(spec.methods)


def check_transfer(spec: SweepSpec) -> None:
    """The transfer section against the sweep (its pairs and methods) and the probe config's schema.

    The dataset folders' existence is checked with the runs' data.root (plan.build_plan), so
    that a dry run can show the plan before the data is in place.
    """
    from rrd_fast.transfer.config import load_probe_config, validate

    transfer = spec.transfer
    if transfer is None:
        return
    where = f"{spec.source}: transfer"
    known = transfer_datasets()
    if not transfer.datasets:
        raise SweepError(f"{where}.datasets: expected a mapping of data set to folder, e.g. "
                         f"{{stl10: DIR, tiny_imagenet: DIR}} (data sets: {', '.join(known)})")
    for dataset, root in transfer.datasets.items():
        if dataset not in known:
            raise SweepError(f"{where}.datasets.{dataset}: unknown data set{did_you_mean(str(dataset), known)} "
                             f"(known: {', '.join(known)})")
        if not isinstance(root, str) or not root:
            raise SweepError(f"{where}.datasets.{dataset}: expected the data set's folder, got {root!r}")
    names = [p.name for p in spec.pairs]
    if transfer.pairs is not None and not transfer.pairs:
        raise SweepError(f"{where}.pairs: empty; leave it out to probe every pair's runs")
    for i, pair in enumerate(transfer.pairs or []):
        if pair not in names:
            raise SweepError(f"{where}.pairs[{i}]: {pair!r} is not a pair of this sweep{did_you_mean(pair, names)}")
    allowed = (["vanilla"] if spec.student_baseline else []) + list(spec.methods)
    methods = transfer.methods or []
    for i, method in enumerate(methods):
        if method not in allowed:
            why = " (vanilla, the students alone, needs student_baseline: true)" if method == "vanilla" else ""
            raise SweepError(f"{where}.methods[{i}]: {method!r} is not a method of this sweep{why}"
                             f"{did_you_mean(method, allowed)} (its methods: {', '.join(allowed)})")
    if len(set(methods)) != len(methods):
        raise SweepError(f"{where}.methods: {methods} repeats a method")
    if transfer.methods is not None and not methods and not transfer.teacher:
        raise SweepError(f"{where}.methods: empty and teacher: false, so nothing would be probed")
    for i, text in enumerate(transfer.overrides):
        key = text.split("=", 1)[0].strip()
        if key in TRANSFER_OWN_KEYS:
            raise SweepError(f"{where}.overrides[{i}] ({text}): {key} is set by {TRANSFER_OWN_KEYS[key]}")
        try:
            load_probe_config(None, [text], values={"root": "."})
        except ConfigError as exc:
            raise SweepError(f"{where}.overrides[{i}] ({text}): {exc}") from None
    for dataset, root in transfer.datasets.items():
        try:
            validate(load_probe_config(None, transfer.overrides, values={"dataset": dataset, "root": root,
                                                                          "bn": transfer.bn}))
        except ConfigError as exc:
            raise SweepError(f"{where} ({dataset}): {exc}") from None


def published_table(spec: SweepSpec) -> Any:
    """The sweep's PublishedTable, or None."""
    if not spec.published:
        return None
    from rrd_fast.sweep.published import load_published

    try:
        return load_published(spec.published)
    except ConfigError as exc:
        raise SweepError(f"{spec.source}: {exc}") from None


def _arches_of(config: Path, where: str) -> tuple[str, str]:
    from rrd_fast.config import load_config

    try:
        cfg = load_config(config)
    except ConfigError as exc:
        raise SweepError(f"{where}: {exc}") from None
    if not cfg.teacher.arch:
        raise SweepError(f"{where}: {config} sets no teacher.arch, so it is not a pair config")
    return cfg.teacher.arch, cfg.student.arch


def resolve_pairs(spec: SweepSpec) -> None:
    """Fill each pair's names and config files, and check that they exist.

    A named pair reads `<config_dir>/<name>.yaml` and the teacher's and student's
    `<config_dir>/<arch>_vanilla.yaml`. An inline pair with `config:` derives its teacher
    and student-alone runs from that config; one without takes the config_dir files, or
    the built-in defaults when config_dir is null.
    """
    from rrd_fast.models import list_models

    where = spec.source
    models = list_models()
    config_dir = Path(spec.config_dir) if spec.config_dir else None
    seen: dict[str, int] = {}
    for i, pair in enumerate(spec.pairs):
        here = f"{where}: pairs[{i}]"
        inline = bool(pair.teacher or pair.student)
        if inline and not (pair.teacher and pair.student):
            raise SweepError(f"{here}: an inline pair needs both teacher and student architectures")
        if not inline:
            if not pair.name:
                raise SweepError(f"{here}: expected a pair name or a mapping with teacher and student")
            if config_dir is None:
                raise SweepError(f"{here}: pair {pair.name!r} is named, but config_dir is null; give teacher and student")
            if not pair.config:
                pair.config = str(config_dir / f"{pair.name}.yaml")
                if not Path(pair.config).is_file():
                    raise SweepError(f"{here}: unknown pair {pair.name!r}: no config {pair.config}")
            pair.teacher, pair.student = _arches_of(Path(pair.config), here)
        for role in ("teacher", "student"):
            arch = getattr(pair, role)
            if arch not in models:
                raise SweepError(f"{here}.{role}: unknown model {arch!r}{did_you_mean(arch, models)}")
        pair.name = pair.name or f"{pair.teacher}_{pair.student}"
        pair.published = pair.published or pair.name
        if pair.name in seen:
            raise SweepError(f"{here}: pair name {pair.name!r} repeats pairs[{seen[pair.name]}]; give one a name:")
        seen[pair.name] = i
        derive = inline and bool(pair.config)
        if inline and not pair.config and config_dir is not None:
            pair.config = str(config_dir / f"{pair.name}.yaml")
            if not Path(pair.config).is_file():
                raise SweepError(f"{here}: unknown pair {pair.name!r}: no config {pair.config} (give config: FILE)")
        for key, arch, needed in (("teacher_config", pair.teacher, not pair.teacher_checkpoint),
                                  ("student_config", pair.student, spec.student_baseline)):
            if not getattr(pair, key) and needed and config_dir is not None and not derive:
                setattr(pair, key, str(config_dir / f"{arch}_vanilla.yaml"))
        for key in ("config", "teacher_config", "student_config"):
            value = getattr(pair, key)
            if value and not Path(value).is_file():
                raise SweepError(f"{here}.{key}: config file {value} not found")
        if pair.teacher_checkpoint and not Path(pair.teacher_checkpoint).exists():
            raise SweepError(f"{here}.teacher_checkpoint: {pair.teacher_checkpoint} not found")
