"""Thread count and OpenMP wait policy: the same short KD run under each launcher, idle and beside a competing job.

    python -m rrd_fast.bench threads [--quick] [--rounds 2] [--launchers python,accelerate]
                                     [--threads auto,1,2] [--wait-policies default,libgomp]
                                     [--loads idle,busy] [--out threads.json]

Every variant is a real training run in its own process tree, started the way a user starts
one: `python rrd_fast/train.py ...` or `accelerate launch --cpu --num_processes 1
rrd_fast/train.py ...`, with `train.threads` (auto = 0, or a count), OpenMP's wait policy
in the environment (libgomp reads it once, when torch loads it), and either an otherwise
idle machine or one competing job: a second identical run, started first with the same
launcher and environment but its own default threads, as another user's job would be, and
stopped when the measured run ends. The measured run is started only once the competitor
has written its config.yaml, i.e. has finished starting up and begun training.

The workload is the README demo's kind of run: KD from an online resnet20 teacher (random
weights: speed does not depend on them) to resnet8 on Fashion-MNIST-layout data written by
pipelines/synthetic.py, batch 128, `train.mixed_precision: auto` as in the shipped configs. Each run's img/s is
the median over its epochs in metrics.jsonl (the first excluded when there are two or
more); variants are timed in interleaved rounds (odd rounds in reverse order) and the table
shows medians over rounds. The thread count each run resolved is read back from its own
config.yaml, so the table itself checks that auto resolves the same under every launcher.

Wait policies: `default` (nothing set: the trainer's own choice, OMP_WAIT_POLICY=PASSIVE
from rrd_fast/malloc_tuning.py), `libgomp` (GOMP_SPINCOUNT=300000: libgomp's built-in default,
a waiting thread spins that many times before it sleeps, unless the process has more threads
than CPUs it may run on, which two jobs on one machine do not see; setting it keeps the
trainer's default out), `passive` (OMP_WAIT_POLICY=PASSIVE: sleep at once), `active`
(OMP_WAIT_POLICY=ACTIVE) and `spincount=N` (GOMP_SPINCOUNT=N). Every run starts with
OMP_DISPLAY_ENV=verbose, so libgomp prints the wait policy and spin count it took into the
run's log; the table's `spin` column is that spin count, read back from the training process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Collection

from rrd_fast.bench.common import load_average, machine_info, machine_name, usable_cores, write_json
from rrd_fast.cli import RunError

HELP = "thread count and OpenMP wait policy under each launcher, idle and with a competing job"

REPO = Path(__file__).resolve().parent.parent.parent
TRAIN_SCRIPT = REPO / "rrd_fast" / "train.py"
LAUNCHERS: dict[str, list[str]] = {
    "python": [],
    "accelerate": ["-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1"],
}
LAUNCHER_LABELS = {"python": "python rrd_fast/train.py", "accelerate": "accelerate launch --cpu"}
LOADS = ("idle", "busy")
# Removed from every run's environment, so that each starts as a user's fresh shell would and only the
# variant's own settings differ: thread and wait settings, and a surrounding launcher's process group.
CLEARED_VARS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "KMP_AFFINITY",
                "MKL_NUM_THREADS", "LOCAL_WORLD_SIZE", "WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_THREADS, DEFAULT_WAIT = 0, "default"  # the trainer's defaults: what the ratio column compares with
LIBGOMP_SPINCOUNT = "300000"  # libgomp's spin count when no wait policy is set (its documentation)
TEACHER, STUDENT = "resnet20", "resnet8"
FMNIST_NORMALIZATION = {"mean": [0.2860], "std": [0.3530]}
COMPETITOR_EPOCHS = 100_000  # stopped by us once the measured run ends


@dataclass(frozen=True)
class Workload:
    """The size of every run: few enough images that a variant takes seconds, enough to time."""

    train_images: int
    eval_images: int
    batch_size: int
    epochs: int
    eval_teacher: bool  # the teacher's top-1 before training: start-up work only, skipped when quick


FULL = Workload(train_images=2048, eval_images=512, batch_size=128, epochs=3, eval_teacher=True)
QUICK = Workload(train_images=256, eval_images=64, batch_size=64, epochs=2, eval_teacher=False)


@dataclass(frozen=True)
class Variant:
    launcher: str
    threads: int  # 0: auto
    wait: str
    load: str

    @property
    def key(self) -> str:
        return f"{self.launcher}-t{self.threads or 'auto'}-{self.wait.replace('=', '')}-{self.load}"


@dataclass
class Outcome:
    """What one variant measured, round by round."""

    variant: Variant
    img_s: list[float] = field(default_factory=list)
    resolved_threads: list[int] = field(default_factory=list)
    competitor_threads: list[int] = field(default_factory=list)
    spin_counts: list[str] = field(default_factory=list)  # as libgomp reported them, per round
    wall_s: list[float] = field(default_factory=list)
    epochs_img_s: list[list[float]] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.img_s)


# ---------------------------------------------------------------------------------------
# parsing the lists on the command line
# ---------------------------------------------------------------------------------------

def _items(value: str, option: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise RunError(f"{option}: expected a comma-separated list, got {value!r}")
    return list(dict.fromkeys(items))


def _choices(value: str, option: str, allowed: Collection[str]) -> list[str]:
    items = _items(value, option)
    for item in items:
        if item not in allowed:
            raise RunError(f"{option}: {item!r} is not one of {', '.join(allowed)}")
    return items


def parse_launchers(value: str) -> list[str]:
    return _choices(value, "--launchers", LAUNCHERS)


def parse_threads(value: str) -> list[int]:
    """'auto,1,2' -> [0, 1, 2]."""
    counts = []
    for item in _items(value, "--threads"):
        if item == "auto":
            counts.append(0)
        elif item.isdigit() and int(item) > 0:
            counts.append(int(item))
        else:
            raise RunError(f"--threads: {item!r} is not auto or a positive integer")
    return list(dict.fromkeys(counts))


def wait_environment(name: str) -> dict[str, str]:
    """The variables a wait-policy name sets (every other wait setting is removed)."""
    if name == "default":
        return {}
    if name == "libgomp":
        return {"GOMP_SPINCOUNT": LIBGOMP_SPINCOUNT}
    if name in ("passive", "active"):
        return {"OMP_WAIT_POLICY": name.upper()}
    spins = name.removeprefix("spincount=")
    if spins != name and (spins.isdigit() or spins == "infinite"):
        return {"GOMP_SPINCOUNT": spins.upper() if spins == "infinite" else spins}
    raise RunError(f"--wait-policies: {name!r} is not default, libgomp, passive, active or spincount=N")


def parse_waits(value: str) -> list[str]:
    items = [item.lower() for item in _items(value, "--wait-policies")]
    for item in items:
        wait_environment(item)
    return items


def parse_loads(value: str) -> list[str]:
    return _choices(value, "--loads", LOADS)


def default_threads() -> str:
    """auto, 1, 2, and the cores this process may use when that is another count."""
    counts = ["auto", "1", "2"]
    if str(usable_cores()) not in counts:
        counts.append(str(usable_cores()))
    return ",".join(counts)


# ---------------------------------------------------------------------------------------
# one run
# ---------------------------------------------------------------------------------------

def prepare_inputs(workdir: Path, work: Workload) -> tuple[Path, Path]:
    """Fashion-MNIST IDX files and a teacher checkpoint, once for every run."""
    import torch

    from pipelines.synthetic import write_fashion_mnist
    from rrd_fast.checkpoint import write_model_checkpoint
    from rrd_fast.models import create_model

    data = write_fashion_mnist(workdir / "data", n_train=work.train_images, n_test=work.eval_images, gz=True, seed=0)
    teacher = workdir / "teacher"
    teacher.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    write_model_checkpoint(teacher, create_model(TEACHER, num_classes=10, in_channels=1),
                           {"arch": TEACHER, "num_classes": 10, "in_channels": 1, "image_size": 28,
                            "normalization": FMNIST_NORMALIZATION})
    return data, teacher


def train_command(launcher: str, overrides: list[str]) -> list[str]:
    return [sys.executable, *LAUNCHERS[launcher], str(TRAIN_SCRIPT), *overrides]


def run_overrides(name: str, runs: Path, data: Path, teacher: Path, work: Workload, threads: int,
                  epochs: int) -> list[str]:
    return [f"name={name}", f"output_dir={runs}", "data.format=fashion_mnist", f"data.root={data}",
            f"data.batch_size={work.batch_size}", f"data.eval_batch_size={min(work.eval_images, 1000)}",
            f"student.arch={STUDENT}", f"teacher.checkpoint={teacher}", "method.name=kd",
            f"teacher.eval_top1={str(work.eval_teacher).lower()}", f"optim.epochs={epochs}",
            "train.mixed_precision=auto", "train.progress=false", f"train.threads={threads}"]


def run_environment(wait: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without thread or wait settings, plus the variant's wait policy; CPU only."""
    base = dict(os.environ if base is None else base)
    env = {k: v for k, v in base.items() if k not in CLEARED_VARS}
    env["ACCELERATE_USE_CPU"] = "true"  # the python launcher too: this measures CPU threads
    env["OMP_DISPLAY_ENV"] = "verbose"  # libgomp reports the wait settings it took (`libgomp_wait`)
    env.update(wait_environment(wait))
    return env


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, env=env, cwd=log.parent, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group: a launcher's child stops with it


def _stop(proc: subprocess.Popen) -> None:
    """Stop a run we started and everything it started (accelerate's child), by its process group."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _tail(log: Path, lines: int = 3) -> str:
    text = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    return " | ".join(text[-lines:]) or "no output"


def libgomp_wait(log: Path) -> dict[str, str] | None:
    """OMP_WAIT_POLICY and GOMP_SPINCOUNT as the last process in `log` to load libgomp printed them
    (OMP_DISPLAY_ENV); under accelerate launch the launcher prints first, the training process last."""
    text = log.read_text(errors="replace") if log.exists() else ""
    block = text.rpartition("OPENMP DISPLAY ENVIRONMENT BEGIN")[2].partition("OPENMP DISPLAY ENVIRONMENT END")[0]
    found = {}
    for line in block.splitlines():
        name, sep, value = line.strip().partition(" = ")
        if sep and name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
            found[name] = value.strip("'")
    return found or None


def resolved_threads(run_dir: Path) -> int:
    """The thread count a run used, from its own saved config.yaml."""
    import yaml

    return int(yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["threads"])


def epoch_speeds(run_dir: Path) -> list[float]:
    """img/s of each main-stage epoch in metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [float(r["images_per_s"]) for r in records if r.get("stage", "main") == "main"]


def run_speed(speeds: list[float]) -> float:
    """Median over epochs, the first excluded when there are two or more (it pays the warm-up)."""
    if not speeds:
        raise RunError("metrics.jsonl: no main-stage epoch recorded")
    return statistics.median(speeds[1:] if len(speeds) >= 2 else speeds)


def wait_until_training(proc: subprocess.Popen, run_dir: Path, log: Path, timeout: float) -> None:
    """Return once the competitor has saved its config.yaml, written just before its first step."""
    deadline = time.monotonic() + timeout
    while not (run_dir / "config.yaml").is_file():
        if proc.poll() is not None:
            raise RunError(f"the competing run exited with code {proc.returncode} before training: {_tail(log)}")
        if time.monotonic() > deadline:
            _stop(proc)
            raise RunError(f"the competing run did not start training within {timeout:.0f} s: {_tail(log)}")
        time.sleep(0.2)
    time.sleep(0.5)  # past the config write, into its first steps


def measure_once(variant: Variant, name: str, runs: Path, data: Path, teacher: Path, work: Workload,
                 timeout: float) -> dict[str, Any]:
    """One measured run of `variant` (with its competitor when busy): img/s, epochs, resolved threads."""
    env = run_environment(variant.wait)
    competitor = None
    record: dict[str, Any] = {"variant": variant.key, "name": name, "load_average_before": load_average()}
    if variant.load == "busy":
        rival = f"{name}_competitor"
        log = runs / f"{rival}.log"
        competitor = _start(train_command(variant.launcher, run_overrides(rival, runs, data, teacher, work,
                                                                          DEFAULT_THREADS, COMPETITOR_EPOCHS)), env, log)
        try:
            wait_until_training(competitor, runs / rival, log, timeout)
        except BaseException:
            _stop(competitor)
            raise
        record["competitor_threads"] = resolved_threads(runs / rival)
        record["competitor_libgomp"] = libgomp_wait(log)
    log = runs / f"{name}.log"
    started = time.perf_counter()
    proc = _start(train_command(variant.launcher, run_overrides(name, runs, data, teacher, work, variant.threads,
                                                                work.epochs)), env, log)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        _stop(proc)
        competitor_alive = competitor is not None and competitor.poll() is None
        if competitor is not None:
            _stop(competitor)
    if code is None:
        raise RunError(f"{variant.key}: the run did not finish within {timeout:.0f} s: {_tail(log)}")
    if code != 0:
        raise RunError(f"{variant.key}: the run exited with code {code}: {_tail(log)}")
    if competitor is not None and not competitor_alive:
        raise RunError(f"{variant.key}: the competing run stopped before the measured one finished: "
                       f"{_tail(runs / f'{name}_competitor.log')}")
    speeds = epoch_speeds(runs / name)
    record.update(wall_s=time.perf_counter() - started, epochs_img_s=speeds, img_s=run_speed(speeds),
                  threads=resolved_threads(runs / name), libgomp=libgomp_wait(log))
    return record


# ---------------------------------------------------------------------------------------
# all variants, in interleaved rounds
# ---------------------------------------------------------------------------------------

def round_order(variants: list[Variant], index: int) -> list[Variant]:
    """Forward in even rounds, reversed in odd ones, so that a drifting machine load evens out."""
    return list(variants) if index % 2 == 0 else list(reversed(variants))


def measure(variants: list[Variant], rounds: int, work: Workload, workdir: Path, timeout: float,
            log: Callable[[str], None]) -> tuple[list[Outcome], list[dict[str, Any]]]:
    data, teacher = prepare_inputs(workdir, work)
    runs = workdir / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    outcomes = {v: Outcome(v) for v in variants}
    records = []
    total, done = rounds * len(variants), 0
    for index in range(rounds):
        for variant in round_order(variants, index):
            rec = measure_once(variant, f"r{index}_{variant.key}", runs, data, teacher, work, timeout)
            rec["round"] = index
            records.append(rec)
            out = outcomes[variant]
            out.img_s.append(rec["img_s"])
            out.resolved_threads.append(rec["threads"])
            out.wall_s.append(rec["wall_s"])
            out.spin_counts.append((rec["libgomp"] or {}).get("GOMP_SPINCOUNT", "?"))
            out.epochs_img_s.append(rec["epochs_img_s"])
            if "competitor_threads" in rec:
                out.competitor_threads.append(rec["competitor_threads"])
            done += 1
            log(f"[{done}/{total}] {variant.key}: {rec['img_s']:.0f} img/s with {rec['threads']} threads "
                f"({rec['wall_s']:.0f} s)")
    return [outcomes[v] for v in variants], records


def default_of(outcomes: list[Outcome], variant: Variant) -> Outcome | None:
    """The trainer's default (auto threads, libgomp's wait policy) with the same launcher and load."""
    for out in outcomes:
        v = out.variant
        if (v.launcher, v.load, v.threads, v.wait) == (variant.launcher, variant.load, DEFAULT_THREADS, DEFAULT_WAIT):
            return out
    return None


def rows(outcomes: list[Outcome]) -> list[dict[str, Any]]:
    table = []
    for out in outcomes:
        v, base = out.variant, default_of(outcomes, out.variant)
        table.append({"variant": v.key, "launcher": v.launcher, "threads": v.threads or "auto",
                      "resolved_threads": sorted(set(out.resolved_threads)),
                      "competitor_threads": sorted(set(out.competitor_threads)), "wait_policy": v.wait,
                      "spin_count": sorted(set(out.spin_counts)),
                      "wait_environment": wait_environment(v.wait), "load": v.load, "img_s": out.median,
                      "img_s_rounds": out.img_s, "epochs_img_s": out.epochs_img_s, "wall_s": out.wall_s,
                      "ratio_to_default": out.median / base.median if base is not None else None})
    return table


def auto_check(table: list[dict[str, Any]]) -> dict[str, Any]:
    """The thread counts auto resolved to under each launcher: the claim is one count everywhere."""
    per_launcher: dict[str, set[int]] = {}
    for row in table:
        auto = row["resolved_threads"] if row["threads"] == "auto" else []
        for count in [*auto, *row["competitor_threads"]]:  # competitors run with auto threads too
            per_launcher.setdefault(row["launcher"], set()).add(count)
    counts = {k: sorted(v) for k, v in per_launcher.items()}
    every = {c for v in counts.values() for c in v}
    return {"auto_threads": counts, "same_under_every_launcher": len(every) == 1 if every else None}


def format_table(table: list[dict[str, Any]]) -> str:
    head = ["launcher", "threads", "used", "wait policy", "spin", "load", "img/s", "x default"]
    body = []
    for r in table:
        used = ",".join(map(str, r["resolved_threads"]))
        load = r["load"] if r["load"] == "idle" else f"+1 job ({','.join(map(str, r['competitor_threads']))} thr)"
        ratio = f"{r['ratio_to_default']:.2f}" if r["ratio_to_default"] is not None else "-"
        body.append([LAUNCHER_LABELS[r["launcher"]], str(r["threads"]), used, r["wait_policy"],
                     ",".join(r["spin_count"]), load,
                     f"{r['img_s']:.0f}", ratio])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_report(result: dict[str, Any]) -> str:
    cfg, m = result["config"], result["machine"]
    check = result["auto_check"]
    load, end = m.get("load_average_start"), m.get("load_average_end")
    lines = [f"rrd_fast.bench threads on {cfg['machine_name']}, torch {m['torch']}, "
             f"KD {TEACHER} -> {STUDENT} (online teacher), {cfg['train_images']} images, batch {cfg['batch_size']}, "
             f"{cfg['epochs']} epochs (img/s: median over epochs after the first, then over {cfg['rounds']} rounds)"
             + (f"; 1-min load average {load[0]:.2f} at start, {end[0]:.2f} at the end" if load and end else ""),
             format_table(result["table"]),
             "used: the thread count each run resolved, read from its config.yaml; spin: the GOMP_SPINCOUNT libgomp "
             "took in the training process; +1 job: a second identical run (auto threads, same launcher and wait "
             "policy) alongside; x default: against the trainer's defaults (auto threads, wait policy default), "
             "same launcher and load"]
    if check["same_under_every_launcher"] is not None:
        per = ", ".join(f"{','.join(map(str, v))} under {LAUNCHER_LABELS[k]}" for k, v in check["auto_threads"].items())
        verdict = "the same under every launcher" if check["same_under_every_launcher"] else "NOT the same under every launcher"
        lines.append(f"train.threads=auto resolved to {per} (runs' config.yaml): {verdict}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------

def command(args: argparse.Namespace) -> int:
    """`python -m rrd_fast.bench threads`: run every variant, print the table, optionally write JSON."""
    launchers, counts = parse_launchers(args.launchers), parse_threads(args.threads)
    waits, loads = parse_waits(args.wait_policies), parse_loads(args.loads)
    if args.rounds < 1:
        raise RunError(f"--rounds: expected at least 1, got {args.rounds}")
    work = QUICK if args.quick else FULL
    work = replace(work, **{k: v for k, v in (("train_images", args.images), ("epochs", args.epochs),
                                              ("batch_size", args.batch_size)) if v is not None})
    if work.batch_size < 1 or work.train_images < work.batch_size or work.epochs < 1:
        raise RunError(f"--images/--epochs: need at least one batch ({work.batch_size} images) and one epoch, "
                       f"got {work.train_images} images and {work.epochs} epochs")
    variants = [Variant(launcher, threads, wait, load)
                for load in loads for launcher in launchers for threads in counts for wait in waits]

    def log(msg: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    started = time.time()
    info = machine_info()
    keep = args.workdir is not None
    workdir = Path(args.workdir) if keep else Path(tempfile.mkdtemp(prefix="rrd-fast-bench-threads-"))
    if keep and (workdir / "runs").exists() and any((workdir / "runs").iterdir()):
        raise RunError(f"--workdir: {workdir / 'runs'} already holds runs; give an empty or new folder")
    try:
        outcomes, records = measure(variants, args.rounds, work, workdir, args.timeout, log)
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    info["load_average_end"] = load_average()
    table = rows(outcomes)
    result = {
        "benchmark": "rrd_fast.bench threads",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": info,
        "config": {"machine_name": machine_name(), "usable_cores": usable_cores(), "quick": args.quick,
                   "rounds": args.rounds, "teacher": TEACHER, "student": STUDENT, "method": "kd",
                   "train_images": work.train_images, "eval_images": work.eval_images, "batch_size": work.batch_size,
                   "epochs": work.epochs, "launchers": {k: LAUNCHER_LABELS[k] for k in launchers}},
        "table": table,
        "auto_check": auto_check(table),
        "runs": records,
        "wall_s": time.time() - started,
    }
    print(format_report(result))
    if args.out:
        write_json(args.out, result)
        print(f"wrote {args.out}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help=f"test-sized runs ({QUICK.train_images} images, {QUICK.epochs} epochs) instead of "
                             f"{FULL.train_images} images, {FULL.epochs} epochs")
    parser.add_argument("--images", type=int, help=f"training images per run (default {FULL.train_images}, "
                                                   f"{QUICK.train_images} with --quick)")
    parser.add_argument("--epochs", type=int, help=f"epochs per run (default {FULL.epochs}, {QUICK.epochs} with --quick)")
    parser.add_argument("--batch-size", type=int, help=f"default {FULL.batch_size} ({QUICK.batch_size} with --quick)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the table shows medians")
    parser.add_argument("--launchers", default=",".join(LAUNCHERS), help="python and/or accelerate")
    parser.add_argument("--threads", default=default_threads(),
                        help="train.threads values: auto and/or counts (default: auto, 1, 2 and this machine's cores)")
    parser.add_argument("--wait-policies", default="default,libgomp",
                        help="default (the trainer's: PASSIVE), libgomp (its own default, GOMP_SPINCOUNT=300000), "
                             "passive, active, spincount=N (GOMP_SPINCOUNT)")
    parser.add_argument("--loads", default=",".join(LOADS), help="idle and/or busy (one competing identical run)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one run may take")
    parser.add_argument("--workdir", type=Path,
                        help="keep the data, runs and logs here (default: a temporary folder, removed at the end)")
    parser.add_argument("--out", type=Path, help="write the table, every run and the machine as JSON here")
