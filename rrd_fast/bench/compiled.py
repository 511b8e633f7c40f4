"""Compiled against eager training steps (`train.compile`), side by side in one run.

    python -m rrd_fast.bench compile [--models resnet32x4:resnet8x4 resnet56:resnet20] [--batch-sizes 64 256]
                                     [--precisions fp32] [--rounds 5] [--steps 3] [--trajectory-steps 50] [--out F]

For every teacher:student pair, batch size and precision, each eager and compiled (the trainer's
`Compiler`: Inductor, static shapes, foreach SGD as the trainer uses):
  student  the student alone with CE (the `vanilla` objective): the limit of a distillation step;
  online   the frozen teacher's forward, then RRD+KD (the authors' weights) through `DistillModule`;
  cached   RRD+KD with the teacher's outputs already on the device in fp32, as the teacher cache serves
           them (the cache's gather and copy are measured by `python -m rrd_fast.bench cache`).
Batches are generated once and reused, so the figures are the step's compute, not the pipeline's.
Variants are timed in interleaved rounds (the machine may be shared); figures are medians. The
first compiled call's time is reported as the compile time, and a fresh process then compiles the
student step again against the same Inductor cache, which is what the second run of a sweep pays.
The trajectory check runs KD, RRD+KD and FitNet for N steps eager and compiled from the same
weights on the same batches and reports the largest relative loss difference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from rrd_fast.bench.common import CHANNELS, IMAGE_SIZE, NUM_CLASSES, load_average, machine_info, write_json

HELP = "eager against compiled steps: student alone, distillation online and cached; compile time; trajectory"
KINDS = ("student", "online", "cached")
TRAJECTORY_METHODS = ("kd", "rrd_kd", "fitnet")


def _method(name: str):
    """The method with its authors' weights, as `method.name=NAME` alone gives them."""
    from rrd_fast.config import MethodConfig
    from rrd_fast.methods.objective import resolve_weights

    method = MethodConfig(name=name)
    method.gamma, method.alpha, method.beta = resolve_weights(method)
    return method


def build_step(kind: str, teacher_arch: str, student_arch: str, batch: int, precision: str, compiled: bool,
               method: str = "rrd_kd", seed: int = 0) -> Callable[[], float]:
    """One training step of `kind` on two held batches; returns a function doing one step (-> its loss)."""
    import torch

    from rrd_fast.bench.train import autocast_for
    from rrd_fast.compile import Compiler, sgd
    from rrd_fast.methods import Objective, TermContext
    from rrd_fast.models import create_model
    from rrd_fast.trainer import DistillModule, net_info
    from pipelines.batch import Batch

    cpu, cl = torch.device("cpu"), torch.channels_last
    compiler = Compiler(compiled, device=cpu)
    torch.manual_seed(seed)
    teacher = create_model(teacher_arch, num_classes=NUM_CLASSES, in_channels=CHANNELS).to(memory_format=cl)
    teacher.eval().requires_grad_(False)
    student = create_model(student_arch, num_classes=NUM_CLASSES, in_channels=CHANNELS)
    info = net_info(student, student_arch, NUM_CLASSES, CHANNELS, IMAGE_SIZE)
    objective = Objective(_method("vanilla" if kind == "student" else method), info,
                          net_info(teacher, teacher_arch, NUM_CLASSES, CHANNELS, IMAGE_SIZE), TermContext(4 * batch, seed=0))
    module = compiler.module(DistillModule(student.to(memory_format=cl), objective).train())
    optimizer = sgd([p for p in module.parameters() if p.requires_grad], cpu, lr=0.05, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(seed)
    batches = [Batch(images=torch.randn(batch, CHANNELS, IMAGE_SIZE, IMAGE_SIZE, generator=generator).contiguous(memory_format=cl),
                     labels=torch.randint(0, NUM_CLASSES, (batch,), generator=generator),
                     index=torch.arange(i * batch, (i + 1) * batch), aug=torch.zeros(batch, 3), epoch=0) for i in range(2)]
    teacher_forward = compiler.function(teacher)

    def run_teacher(images: torch.Tensor) -> Any:
        with torch.no_grad(), autocast_for(precision):
            return teacher_forward(images, features=True)

    held = [run_teacher(b.images) for b in batches] if kind == "cached" else None
    state = {"i": 0}

    def step() -> float:
        i = state["i"] % len(batches)
        state["i"] += 1
        b = batches[i]
        teacher_out = None if kind == "student" else held[i] if held is not None else run_teacher(b.images)
        with autocast_for(precision):
            _, losses = module(b.images, teacher_out, b)
        total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        return total.detach()

    return step


def measure_speed(pairs: list[tuple[str, str]], batch_sizes: list[int], precisions: list[str], rounds: int, steps: int,
                  log: Callable[[str], None]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for teacher, student in pairs:
        for batch in batch_sizes:
            for precision in precisions:
                variants = []
                for kind in KINDS:
                    for compiled in (False, True):
                        step = build_step(kind, teacher, student, batch, precision, compiled)
                        began = time.perf_counter()
                        step()  # the first call compiles
                        first = time.perf_counter() - began
                        variants.append({"pair": f"{teacher}:{student}", "batch": batch, "precision": precision,
                                         "kind": kind, "compiled": compiled, "first_step_s": first, "step": step,
                                         "samples": []})
                        log(f"built {teacher}:{student} b{batch} {precision} {kind} "
                            f"{'compiled' if compiled else 'eager'} (first step {first:.1f} s)")
                for _ in range(rounds):
                    for v in variants:
                        v["step"]()  # warm-up of this round
                        began = time.perf_counter()
                        for _ in range(steps):
                            v["step"]()
                        v["samples"].append(steps * batch / (time.perf_counter() - began))
                for v in variants:
                    v["images_per_s"] = statistics.median(v.pop("samples"))
                    del v["step"]
                    rows.append(v)
    return rows


def measure_trajectory(teacher: str, student: str, batch: int, steps: int) -> dict[str, float]:
    """Largest |compiled - eager| / |eager| of the step loss over `steps` steps, per method."""
    out = {}
    for name in TRAJECTORY_METHODS:
        eager = build_step("cached", teacher, student, batch, "fp32", False, method=name)
        compiled = build_step("cached", teacher, student, batch, "fp32", True, method=name)
        worst = 0.0
        for _ in range(steps):
            a, b = float(eager()), float(compiled())
            worst = max(worst, abs(b - a) / max(abs(a), 1e-30))
        out[name] = worst
    return out


def start_up(student: str, batch: int, cache_dir: Path) -> tuple[float, float]:
    """Seconds of a fresh process's first compiled student step: with an empty Inductor cache (a sweep's
    first run), then with the cache that run left (every later run)."""
    code = ("import time; from rrd_fast.bench.compiled import build_step; "
            f"s = build_step('student', '{student}', '{student}', {batch}, 'fp32', True); t = time.perf_counter(); "
            "s(); print(time.perf_counter() - t)")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir)}
    times = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        times.append(float(proc.stdout.strip().splitlines()[-1]))
    return times[0], times[1]


def format_report(result: dict[str, Any]) -> str:
    lines = [f"threads: {result['threads']}, load average before: {result['load_before']}, after: {result['load_after']}",
             "| pair | batch | precision | step | eager img/s | compiled img/s | compiled/eager | vs student eager | "
             "compile (first step) s |", "|---|---|---|---|---|---|---|---|---|"]
    rows = result["speed"]
    for r in rows:
        if r["compiled"]:
            continue
        c = next(x for x in rows if x["compiled"] and all(x[k] == r[k] for k in ("pair", "batch", "precision", "kind")))
        base = next(x for x in rows if not x["compiled"] and x["kind"] == "student"
                    and all(x[k] == r[k] for k in ("pair", "batch", "precision")))
        lines.append(f"| {r['pair']} | {r['batch']} | {r['precision']} | {r['kind']} | {r['images_per_s']:.1f} | "
                     f"{c['images_per_s']:.1f} | {c['images_per_s'] / r['images_per_s']:.2f} | "
                     f"{r['images_per_s'] / base['images_per_s']:.2f} / {c['images_per_s'] / base['images_per_s']:.2f} | "
                     f"{c['first_step_s']:.1f} |")
    if result.get("trajectory"):
        lines.append("trajectory (largest relative loss difference, compiled vs eager, "
                     f"{result['trajectory_steps']} steps): "
                     + ", ".join(f"{k} {v:.2e}" for k, v in result["trajectory"].items()))
    if result.get("start_up_s"):
        cold, warm = result["start_up_s"]
        lines.append(f"first compiled student step in a fresh process: {cold:.1f} s with an empty Inductor cache, "
                     f"{warm:.1f} s with the cache the first process left")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=["resnet32x4:resnet8x4", "resnet56:resnet20"],
                        metavar="TEACHER:STUDENT")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 256])
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed window")
    parser.add_argument("--trajectory-steps", type=int, default=50, help="0: skip the trajectory check")
    parser.add_argument("--no-start-up", action="store_true", help="skip the fresh-process start-up measurement")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")


def command(args: argparse.Namespace) -> int:
    import torch

    from rrd_fast.bench.train import parse_pairs

    pairs = parse_pairs(args.models)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    result: dict[str, Any] = {"machine": machine_info(), "threads": torch.get_num_threads(), "load_before": load_average()}
    with tempfile.TemporaryDirectory() as cache:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(cache) / "inductor"))
        result["speed"] = measure_speed(pairs, args.batch_sizes, args.precisions, args.rounds, args.steps, log)
        if args.trajectory_steps:
            teacher, student = pairs[0]
            result["trajectory"] = measure_trajectory(teacher, student, args.batch_sizes[0], args.trajectory_steps)
            result["trajectory_steps"] = args.trajectory_steps
        if not args.no_start_up:
            result["start_up_s"] = start_up(pairs[0][1], args.batch_sizes[0], Path(cache) / "start-up")
    result["load_after"] = load_average()
    print(format_report(result))
    if args.out:
        write_json(args.out, result)
    return 0
