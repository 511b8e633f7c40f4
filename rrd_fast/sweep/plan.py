"""The sweep's plan: every run folder it needs, its config, and what is already done.

Runs are ordinary run folders under the sweep's output_dir, named as `rrd_fast.train`
names them: `<teacher>_vanilla_seed<T>` for a teacher, `<student>_vanilla_seed<N>` for a
student alone, `<pair>_<method>_seed<N>` for a distillation. The plan is written to
`sweep.json` in that folder, so workers, reports and reruns read the same plan the
sweep was started with.

Waves order the runs: teachers (0); students alone, and each teacher cache's first run,
which builds the cache (1); the cache's other runs (2). Runs within a wave are independent.
A sweep with a `transfer` section adds probe jobs (`PlannedProbe`, rrd_fast.sweep.probes),
one per probed run and data set, which run after every wave.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from rrd_fast.atomic import write_json_atomic
from rrd_fast.config import ConfigError, RunConfig, config_to_dict, load_config
from rrd_fast.sweep.spec import SweepError, SweepSpec, parse_threshold, published_table

PLAN_FORMAT = "rrd-fast-sweep-plan/1"
PLAN_NAME = "sweep.json"
ROLES = ("teacher", "student_alone", "distill")


@dataclass
class PlannedRun:
    name: str
    role: str  # one of ROLES
    method: str
    seed: int
    config: str  # absolute path of the YAML config, or "" for the built-in defaults
    overrides: list[str]
    wave: int
    pairs: list[str] = field(default_factory=list)
    needs: list[str] = field(default_factory=list)  # runs that must finish first (the teacher)
    epochs: int = 0
    kind: str = ""  # what the step rate depends on; runs of one kind share an estimate

    def load(self) -> RunConfig:
        return load_config(self.config or None, self.overrides)


@dataclass
class PlannedProbe:
    """One linear probe (`rrd_fast.transfer`) of a planned run on one data set; its own job."""

    name: str  # job name: `<run>.transfer.<folder>`
    run: str  # the run folder it probes
    role: str  # the run's role: teacher | student_alone | distill
    method: str  # "teacher", "vanilla" (the student alone) or the distillation method
    seed: int  # the run's seed
    dataset: str
    folder: str  # RUN/transfer/<folder>/ holds its result.json
    values: dict[str, Any]  # dataset, root, bn, seed: the probe config the section sets
    overrides: list[str]  # transfer.overrides, applied after `values`
    epochs: int
    pairs: list[str] = field(default_factory=list)
    kind: str = ""  # what the step rate depends on; probes of one kind share an estimate

    def load(self) -> Any:
        from rrd_fast.transfer.config import load_probe_config

        return load_probe_config(None, self.overrides, values=self.values)


@dataclass
class PairPlan:
    name: str
    teacher: str
    student: str
    published: str
    teacher_run: str  # "" when imported
    teacher_checkpoint: str
    threshold: dict[str, Any] | None  # Threshold as a dict
    student_alone: dict[str, str] = field(default_factory=dict)  # seed -> run name (JSON keys are strings)
    runs: dict[str, dict[str, str]] = field(default_factory=dict)  # method -> seed -> run name
    excluded: dict[str, str] = field(default_factory=dict)  # method -> reason


@dataclass
class Plan:
    name: str
    source: str
    sweep_dir: str
    methods: list[str]
    seeds: list[int]
    published: str | None
    pairs: list[PairPlan]
    runs: dict[str, PlannedRun]
    slurm: dict[str, Any] = field(default_factory=dict)
    probes: dict[str, PlannedProbe] = field(default_factory=dict)  # job name -> probe
    transfer: dict[str, Any] | None = None  # the resolved transfer section (absolute dataset folders)

    @property
    def path(self) -> Path:
        return Path(self.sweep_dir)

    def run_dir(self, name: str) -> Path:
        return self.path / name

    def to_json(self) -> dict[str, Any]:
        return {"format": PLAN_FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Plan":
        data = {k: v for k, v in data.items() if k != "format"}
        data["pairs"] = [PairPlan(**p) for p in data["pairs"]]
        data["runs"] = {k: PlannedRun(**r) for k, r in data["runs"].items()}
        data["probes"] = {k: PlannedProbe(**r) for k, r in data.get("probes", {}).items()}
        return cls(**data)


def write_plan(plan: Plan) -> Path:
    path = plan.path / PLAN_NAME
    write_json_atomic(path, plan.to_json())
    return path


def read_plan(sweep_dir: str | Path) -> Plan:
    path = Path(sweep_dir) / PLAN_NAME
    if not path.is_file():
        raise SweepError(f"{path}: no sweep plan here (is {sweep_dir} a sweep's output_dir?)")
    data = json.loads(path.read_text())
    if data.get("format") != PLAN_FORMAT:
        raise SweepError(f"{path}: field 'format' is {data.get('format')!r}, expected {PLAN_FORMAT!r}")
    return Plan.from_json(data)


VANILLA_RESET = ["method.name=vanilla", "method.gamma=null", "method.alpha=null", "method.beta=null",
                 "method.options={}", "teacher.arch=", "teacher.checkpoint=", "teacher.cache="]


def _check_overrides(spec: SweepSpec) -> None:
    """Each override alone against the schema, so that an error names its field in the sweep file."""
    lists = [("overrides", spec.overrides), ("teacher_overrides", spec.teacher_overrides)]
    lists += [(f"method_overrides.{m}", v) for m, v in spec.method_overrides.items()]
    for key, values in lists:
        for i, text in enumerate(values):
            try:
                load_config(None, [text])
            except ConfigError as exc:
                raise SweepError(f"{spec.source}: {key}[{i}] ({text}): {exc}") from None


def _quoted(path: str | Path) -> str:
    """A path as an override value that YAML reads back verbatim (JSON strings are YAML)."""
    return json.dumps(str(path))


def _kind(cfg: RunConfig) -> str:
    teacher = cfg.teacher.arch if cfg.method.name != "vanilla" else ""
    return json.dumps([teacher, cfg.student.arch, cfg.method.name, bool(cfg.teacher.cache), cfg.data.format,
                       cfg.data.train_limit, cfg.data.batch_size, cfg.train.mixed_precision])


def _cache_dir(spec: SweepSpec, teacher_id: str, cfg: RunConfig) -> str:
    """One cache per teacher, seed (augmentation is a function of it) and set of stored fields."""
    from rrd_fast.cache.manifest import ALWAYS_STORED, required_fields

    extra = [f for f in required_fields(cfg) if f not in ALWAYS_STORED]
    suffix = "-" + "-".join(sorted(extra)) if extra else ""
    return str(Path(spec.teacher_cache).resolve() / teacher_id / f"seed{cfg.seed}{suffix}")


class _Builder:
    def __init__(self, spec: SweepSpec) -> None:
        self.spec = spec
        self.sweep_dir = Path(spec.output_dir).resolve()
        self.runs: dict[str, PlannedRun] = {}
        self.configs: dict[str, RunConfig] = {}
        self.cache_first: set[str] = set()

    def config(self, config: str, overrides: list[str], name: str) -> RunConfig:
        try:
            cfg = load_config(config or None, overrides)
        except ConfigError as exc:
            raise SweepError(f"{self.spec.source}: run {name}: {exc}") from None
        return cfg

    def add(self, name: str, role: str, method: str, seed: int, config: str, overrides: list[str], pair: str,
            needs: list[str], cache_group: str = "") -> None:
        config = str(Path(config).resolve()) if config else ""
        overrides = [*overrides, f"name={name}", f"output_dir={_quoted(self.sweep_dir)}", f"seed={seed}"]
        cfg = self.config(config, overrides, name)
        wave = {"teacher": 0, "student_alone": 1}.get(role, 1)
        if cache_group:
            wave = 2 if cache_group in self.cache_first else 1
            self.cache_first.add(cache_group)
        existing = self.runs.get(name)
        if existing is not None:
            if config_to_dict(self.configs[name]) != config_to_dict(cfg):
                raise SweepError(f"{self.spec.source}: run folder {name} is planned twice with different configs "
                                 f"({existing.role} of pair {existing.pairs[0]}, {role} of pair {pair}); give the pairs "
                                 "distinct names, another teacher_seed, or the same overrides")
            if pair not in existing.pairs:
                existing.pairs.append(pair)
            existing.wave = min(existing.wave, wave)
            return
        self.configs[name] = cfg
        self.runs[name] = PlannedRun(name, role, method, seed, config, overrides, wave, [pair], needs,
                                     cfg.optim.epochs, _kind(cfg))

    def build(self) -> Plan:
        spec = self.spec
        table = published_table(spec)
        pairs = []
        for pair in spec.pairs:
            teacher_pub = table.teacher(pair.published) if table else None
            raw = pair.teacher_min_top1 if pair.teacher_min_top1 is not None else spec.teacher_min_top1
            threshold = parse_threshold(raw, teacher_pub.top1 if teacher_pub else None, spec.source)
            if pair.teacher_checkpoint:
                teacher_run, checkpoint, needs = "", str(Path(pair.teacher_checkpoint).resolve()), []
            else:
                teacher_run = f"{pair.teacher}_vanilla_seed{spec.teacher_seed}"
                checkpoint, needs = str(self.sweep_dir / teacher_run), [teacher_run]
                self.add(teacher_run, "teacher", "vanilla", spec.teacher_seed, pair.teacher_config or pair.config,
                         [*spec.overrides, *spec.teacher_overrides, f"student.arch={pair.teacher}", *VANILLA_RESET],
                         pair.name, [])
            plan = PairPlan(pair.name, pair.teacher, pair.student, pair.published, teacher_run, checkpoint,
                            asdict(threshold) if threshold else None)
            if spec.student_baseline:
                for seed in spec.seeds:
                    name = f"{pair.student}_vanilla_seed{seed}"
                    self.add(name, "student_alone", "vanilla", seed, pair.student_config or pair.config,
                             [*spec.overrides, *spec.method_overrides.get("vanilla", []), f"student.arch={pair.student}",
                              *VANILLA_RESET], pair.name, [])
                    plan.student_alone[str(seed)] = name
            teacher_id = teacher_run or f"{pair.name}_teacher"
            for method in spec.methods:
                rule = spec.excluded(pair.name, method)
                if rule is not None:
                    plan.excluded[method] = rule.reason or "excluded in the sweep file"
                    continue
                plan.runs[method] = {}
                for seed in spec.seeds:
                    name = f"{pair.name}_{method}_seed{seed}"
                    overrides = [*spec.overrides, *spec.method_overrides.get(method, []), f"method.name={method}",
                                 f"student.arch={pair.student}", f"teacher.arch={pair.teacher}",
                                 f"teacher.checkpoint={_quoted(checkpoint)}"]
                    group = ""
                    if spec.teacher_cache:
                        probe = self.config(pair.config, [*overrides, f"seed={seed}"], name)
                        cache = _cache_dir(spec, teacher_id, probe)
                        overrides.append(f"teacher.cache={_quoted(cache)}")
                        group = cache
                    self.add(name, "distill", method, seed, pair.config, overrides, pair.name, needs, group)
                    plan.runs[method][str(seed)] = name
            pairs.append(plan)
        return Plan(spec.name, spec.source, str(self.sweep_dir), list(spec.methods), list(spec.seeds), spec.published,
                    pairs, dict(sorted(self.runs.items(), key=lambda kv: kv[1].wave)), asdict(spec.slurm))


def missing_data(configs: dict[str, RunConfig]) -> list[tuple[str, str]]:
    """(dataset folder, first run reading it) for every data.root that does not exist."""
    missing: dict[str, str] = {}
    for name, cfg in configs.items():
        if not Path(cfg.data.root).exists():
            missing.setdefault(cfg.data.root, name)
    return list(missing.items())


def check_runs(spec: SweepSpec, configs: dict[str, RunConfig], check_data: bool) -> None:
    """What only the resolved run configs show: dataset folders, methods' weights and options."""
    from rrd_fast.methods import MethodError
    from rrd_fast.methods.objective import method_terms

    for name, cfg in configs.items():
        try:
            method_terms(cfg.method)
        except MethodError as exc:
            raise SweepError(f"{spec.source}: run {name}: {exc}") from None
    if check_data:
        for root, name in missing_data(configs):
            raise SweepError(f"{spec.source}: data.root: dataset folder {root} does not exist (run {name})")


def build_plan(spec: SweepSpec, check_data: bool = True) -> Plan:
    """The plan of a checked sweep; raises SweepError before anything runs.

    `check_data=False` (dry runs) leaves missing dataset folders to `missing_data`, so that
    the plan can be looked at before the data is in place.
    """
    _check_overrides(spec)
    builder = _Builder(spec)
    plan = builder.build()
    check_runs(spec, builder.configs, check_data)
    plan.configs = builder.configs  # type: ignore[attr-defined]  # resolved once; not part of sweep.json
    return plan


# ---------------------------------------------------------------------- selection
ONLY_KEYS = ("pair", "method", "seed")


def parse_only(tokens: list[str], plan: Plan) -> dict[str, set[str]]:
    """`--only pair=a,b method=kd seed=0` -> {key: values}, checked against the plan."""
    wanted: dict[str, set[str]] = {}
    known = {"pair": {p.name for p in plan.pairs}, "method": {*plan.methods, "vanilla"},
             "seed": {str(s) for s in plan.seeds}}
    for token in tokens:
        key, sep, values = token.partition("=")
        if not sep or key not in ONLY_KEYS:
            raise SweepError(f"--only {token}: expected key=value with key one of {', '.join(ONLY_KEYS)}")
        for value in values.split(","):
            if value not in known[key]:
                raise SweepError(f"--only {key}={value}: not a {key} of this sweep (known: {', '.join(sorted(known[key]))})")
            wanted.setdefault(key, set()).add(value)
    return wanted


def select(plan: Plan, wanted: dict[str, set[str]]) -> list[str]:
    """Runs matching the selection, plus the teachers they need, in plan order."""
    if not wanted:
        return list(plan.runs)
    chosen: set[str] = set()
    for name, run in plan.runs.items():
        if run.role == "teacher":
            continue
        if ("pair" in wanted and not wanted["pair"] & set(run.pairs)) or \
           ("method" in wanted and run.method not in wanted["method"]) or \
           ("seed" in wanted and str(run.seed) not in wanted["seed"]):
            continue
        chosen.add(name)
        chosen.update(run.needs)
    return [n for n in plan.runs if n in chosen]


# ---------------------------------------------------------------------- status
@dataclass
class RunState:
    state: str  # done | interrupted | partial | new
    epochs_done: int = 0
    seconds_per_epoch: float | None = None
    images_per_s: float | None = None


def main_records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a cut-off last line of a killed write; the trainer rewrites the file whole
    return [r for r in records if r.get("stage", "main") == "main"]


def run_state(run_dir: Path, epochs: int) -> RunState:
    """done: summary.json and every epoch; interrupted: resume state to continue from;
    partial: a run folder without resume state (killed in its first epoch); new: nothing yet."""
    from rrd_fast.run_dir import holds_a_run

    records = main_records(run_dir)
    rates = [r["images_per_s"] for r in records if r.get("images_per_s")]
    times = [r["epoch_time_s"] for r in records if r.get("epoch_time_s")]
    state = RunState("new", len(records), sum(times) / len(times) if times else None,
                     sum(rates) / len(rates) if rates else None)
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            done = int(json.loads(summary.read_text()).get("epochs", 0))
        except (json.JSONDecodeError, ValueError, TypeError):
            done = 0
        if done >= epochs:
            state.state = "done"
            return state
    if (run_dir / "resume" / "state.pt").is_file():
        state.state = "interrupted"
    elif holds_a_run(run_dir):
        state.state = "partial"
    return state


# ---------------------------------------------------------------------- dry run
def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f}"


def estimate_line(noun: str, total: int, counts: dict[str, int], known_s: float, unknown: int, why_unknown: str) -> str:
    """The dry run's summary: how many jobs in each state, and the device-hours left at the measured rates."""
    todo = total - counts.get("done", 0)
    parts = ", ".join(f"{counts[k]} {k}" for k in ("done", "interrupted", "partial", "new") if counts.get(k))
    line = f"{total} {noun}s ({parts or 'none selected'}); estimated GPU-hours left: "
    if todo == 0:
        return line + f"none, every {noun} is finished"
    if unknown == todo:
        return line + f"unknown ({why_unknown})"
    line += f"{_hours(known_s)} for {todo - unknown} {noun}s at the measured step rate"
    return line + (f", unknown for {unknown} more" if unknown else "")


def describe(plan: Plan, names: list[str], out: Callable[[str], None] = print) -> dict[str, Any]:
    """Print the plan: every run's state, and time left from the step rate measured in this sweep."""
    states = {n: run_state(plan.run_dir(n), plan.runs[n].epochs) for n in names}
    rate: dict[str, float] = {}
    for name, st in ((n, run_state(plan.run_dir(n), r.epochs)) for n, r in plan.runs.items()):
        if st.seconds_per_epoch is not None:
            rate.setdefault(plan.runs[name].kind, st.seconds_per_epoch)
    out(f"sweep {plan.name} ({plan.source}): {len(plan.pairs)} pairs, {len(plan.methods)} methods, seeds {plan.seeds}; "
        f"runs in {plan.sweep_dir}")
    width = max([len(n) for n in names] + [3])
    out(f"  {'state':<12} {'wave':<4} {'run':<{width}} {'epochs':>9} {'img/s':>8} {'GPU-h left':>10}")
    known_s, unknown = 0.0, 0
    counts: dict[str, int] = {}
    for name in names:
        run, st = plan.runs[name], states[name]
        counts[st.state] = counts.get(st.state, 0) + 1
        left = 0 if st.state == "done" else run.epochs - min(st.epochs_done, run.epochs)
        per_epoch = rate.get(run.kind)
        if st.state == "done":
            est = "-"
        elif per_epoch is None:
            est, unknown = "unknown", unknown + 1
        else:
            known_s += left * per_epoch
            est = _hours(left * per_epoch)
        ips = f"{st.images_per_s:.0f}" if st.images_per_s else "-"
        out(f"  {st.state:<12} {run.wave:<4} {name:<{width}} {f'{min(st.epochs_done, run.epochs)}/{run.epochs}':>9} "
            f"{ips:>8} {est:>10}")
    for pair in plan.pairs:
        for method, reason in pair.excluded.items():
            out(f"  excluded: {method} on {pair.name} ({reason})")
    todo = len(names) - counts.get("done", 0)
    out(estimate_line("run", len(names), counts, known_s, unknown,
                      "no finished epoch of the same teacher, student, method and data in this sweep yet")
        + " (training time, one device per run, evaluation excluded)")
    known = getattr(plan, "configs", {})
    configs = {n: known[n] if n in known else plan.runs[n].load() for n in names}
    for root, name in missing_data(configs):
        out(f"warning: data.root: dataset folder {root} does not exist (run {name}); the sweep would stop there")
    return {"states": {n: s.state for n, s in states.items()}, "known_hours": known_s / 3600,
            "unknown_runs": unknown, "todo": todo}


def seconds_text(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"

