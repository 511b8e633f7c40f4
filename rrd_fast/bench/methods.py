"""Every distillation method's training step against the student-only step, online and from the cache.

For one teacher -> student pair (default resnet32x4 -> resnet8x4, CIFAR-100 shapes, fp32), each
contender runs `--steps` SGD steps per round, contenders interleaved over `--rounds` rounds, and
the median step time is reported as img/s and as a ratio of the student-only step measured in
the same run. "online" runs the teacher in every step; "cached" feeds the method the teacher
outputs a cache would hold (computed once, outside the timed steps), so it measures the step at
student speed without the cache's read cost (`python -m rrd_fast.bench cache` measures that).
A method is cached only when its declared teacher fields fit `--cache-max-gb` for the CIFAR-100
training set at `--views` views in fp16; the table gives each method's cache size per view.
A two-stage method (AB, FT, FSP) is timed in its main stage.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from pipelines.batch import Batch
from rrd_fast.bench.common import machine_info, write_json
from rrd_fast.cache.builder import estimate_cache_bytes
from rrd_fast.config import MethodConfig
from rrd_fast.methods import Objective, TermContext, list_methods
from rrd_fast.methods.objective import teacher_fields_for
from rrd_fast.models import create_model
from rrd_fast.trainer import net_info

HELP = "each method's step vs the student-only step, online teacher and cached, with cache size per view"
NUM_CLASSES, IMAGE, TRAIN_SAMPLES = 100, 32, 50_000
SMALL_MEMORY = {"rrd": {"rrd": {"queue_size": 16384}}, "rrd_kd": {"rrd": {"queue_size": 16384}}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", default="resnet32x4")
    parser.add_argument("--student", default="resnet8x4")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per contender and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--methods", default="", help="comma-separated subset (default: every method)")
    parser.add_argument("--views", type=int, default=32, help="cache views V for the size estimate")
    parser.add_argument("--cache-max-gb", type=float, default=32.0)
    parser.add_argument("--json", type=Path, default=Path("bench_methods.json"))


def _timed(step: Callable[[], None], steps: int) -> float:
    step()  # warm-up outside the timing
    began = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - began) / steps


def command(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    teacher = create_model(args.teacher, NUM_CLASSES).eval().requires_grad_(False)
    images = torch.randn(args.batch, 3, IMAGE, IMAGE)
    labels = torch.randint(0, NUM_CLASSES, (args.batch,))
    batch = Batch(images, labels, torch.randperm(TRAIN_SAMPLES)[: args.batch], torch.zeros(args.batch, 3), 0)
    context = TermContext(TRAIN_SAMPLES, 0, train_labels=torch.randint(0, NUM_CLASSES, (TRAIN_SAMPLES,)).numpy())
    with torch.no_grad():
        cached_out = teacher(images, features=True)
    t_info = net_info(teacher, args.teacher, NUM_CLASSES, 3, IMAGE)
    methods = [m for m in (args.methods.split(",") if args.methods else list_methods()) if m != "vanilla"]

    def make(method: str | None, online: bool) -> Callable[[], None]:
        student = create_model(args.student, NUM_CLASSES)
        objective = None
        if method is not None:
            cfg = MethodConfig(name=method, options=SMALL_MEMORY.get(method, {}))
            objective = Objective(cfg, net_info(student, args.student, NUM_CLASSES, 3, IMAGE), t_info, context)
        params = [p for m in (student, objective) if m is not None for p in m.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
        reads_teacher = objective is not None and bool(objective.teacher_fields)

        def step() -> None:
            out = student(images, features=objective is not None)
            if objective is None:
                loss = F.cross_entropy(out, labels)
            else:
                t_out = None
                if reads_teacher:
                    if online:
                        with torch.no_grad():
                            t_out = teacher(images, features=True)
                    else:
                        t_out = cached_out
                loss = sum(objective(out, t_out, batch).values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    sizes: dict[str, float] = {}
    contenders: dict[str, Callable[[], None]] = {"student only": make(None, True)}
    for method in methods:
        fields = tuple(dict.fromkeys(("logits", "pooled") + teacher_fields_for(MethodConfig(name=method))))
        with torch.no_grad():
            total, _ = estimate_cache_bytes(teacher, fields, 3, IMAGE, TRAIN_SAMPLES, args.views, "fp16")
        sizes[method] = total / args.views / 2**30
        contenders[f"{method} online"] = make(method, True)
        if total <= args.cache_max_gb * 2**30:
            contenders[f"{method} cached"] = make(method, False)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for round_ in range(args.rounds):
        for name, step in contenders.items():
            times[name].append(_timed(step, args.steps))
            print(f"  round {round_ + 1}: {name} {args.batch / times[name][-1]:.1f} img/s", flush=True)
    median = {name: statistics.median(t) for name, t in times.items()}
    base = median["student only"]
    rows = []
    print(f"{args.teacher} -> {args.student}, batch {args.batch}, fp32, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} rounds x {args.steps} steps")
    print(f"{'contender':<18} {'img/s':>8} {'x student':>10} {'cache GiB/view':>15}")
    for name, seconds in median.items():
        method = name.rsplit(" ", 1)[0]
        size = f"{sizes[method]:.3f}" if method in sizes else ""
        rows.append({"contender": name, "images_per_s": args.batch / seconds, "ratio": base / seconds,
                     "cache_gib_per_view": sizes.get(method)})
        print(f"{name:<18} {args.batch / seconds:>8.1f} {base / seconds:>10.2f} {size:>15}")
    refused = [m for m in methods if f"{m} cached" not in contenders]
    print(f"cache refused (over {args.cache_max_gb:g} GiB at {args.views} views): {', '.join(refused) or 'none'}")
    write_json(args.json, {"machine": machine_info(), "args": {k: str(v) for k, v in vars(args).items() if k != "run"},
                           "rows": rows, "cache_refused": refused})
    return 0

