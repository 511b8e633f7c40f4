"""Compiled against eager training steps (`train.compile`), side by side in one run, on the CPU or a GPU.

    python -m rrd_fast.bench compile [--device cpu|cuda] [--models resnet32x4:resnet8x4 resnet56:resnet20]
        [--batch-sizes 64 256] [--precisions fp32 bf16] [--modes default reduce-overhead max-autotune]
        [--rounds 5] [--steps 3] [--trajectory-steps 50] [--project] [--out F]

For every teacher:student pair, batch size and precision, eager and compiled with each `--modes` entry
(the trainer's `Compiler`: Inductor, static shapes, channels_last, the trainer's SGD):
  student  the student alone with CE (the `vanilla` objective): the limit of a distillation step;
  online   the frozen teacher's forward, then RRD+KD (the authors' weights) through `DistillModule`;
  cached   RRD+KD with the teacher's outputs already on the device, as the teacher cache serves them
           (the cache's gather and copy are measured by `python -m rrd_fast.bench cache`);
and with `--project` also the two passes a full run adds:
  teacher  the teacher's inference forward at the cache build's batch (one pass of the cache build);
  eval     the student's inference forward at the evaluation batch.
Batches are generated once and reused, so the figures are the step's compute, not the pipeline's.
Variants are timed in interleaved rounds (the machine may be shared); figures are medians, in img/s
and steps/s (on CUDA each window is bracketed by synchronisations). The first compiled call's time
is the compile time. `--project` turns the measured rates into the wall time of a full run (the
paper's CIFAR-100 recipe by default: 240 epochs of 50,000 images, 10,000 test images evaluated every
epoch, a cache of 32 views): cache build + training from the cache + evaluation + compile, against
the same run with the teacher online. A variant that fails (a mode this GPU or torch cannot run) is
reported with its error and the others go on; with `--out` the JSON is rewritten after every group.
Without `--no-start-up`, a fresh process then compiles the student step again against the Inductor
cache the first left, which is what the second run of a sweep pays. The trajectory check runs KD,
RRD+KD and FitNet for N steps eager and compiled from the same weights on the same batches and
reports the largest relative loss difference.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from rrd_fast.bench.common import CHANNELS, IMAGE_SIZE, NUM_CLASSES, load_average, machine_info, machine_name, write_json

HELP = "eager against compiled steps (CPU or CUDA, each mode): student alone, distillation online and cached; projection"
STEP_KINDS = ("student", "online", "cached")
PASS_KINDS = ("teacher", "eval")  # with --project
TRAJECTORY_METHODS = ("kd", "rrd_kd", "fitnet")
EAGER = "eager"


def _method(name: str):
    """The method with its authors' weights, as `method.name=NAME` alone gives them."""
    from rrd_fast.config import MethodConfig
    from rrd_fast.methods.objective import resolve_weights

    method = MethodConfig(name=name)
    method.gamma, method.alpha, method.beta = resolve_weights(method)
    return method


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_step(kind: str, teacher_arch: str, student_arch: str, batch: int, precision: str, variant: str,
               method: str = "rrd_kd", seed: int = 0, device: str = "cpu") -> Callable[[], Any]:
    """One step (or pass) of `kind` on held batches, eager or compiled in mode `variant`; returns a
    function doing one step, which returns its loss (a device tensor; None for the inference passes)."""
    import torch

    from rrd_fast.bench.train import autocast_for
    from rrd_fast.compile import Compiler, sgd
    from rrd_fast.methods import Objective, TermContext
    from rrd_fast.models import create_model
    from rrd_fast.trainer import DistillModule, net_info
    from pipelines.batch import Batch

    dev, cl = torch.device(device), torch.channels_last
    compiler = Compiler(variant != EAGER, mode="default" if variant == EAGER else variant, device=dev)
    torch.manual_seed(seed)
    teacher = create_model(teacher_arch, num_classes=NUM_CLASSES, in_channels=CHANNELS).to(dev, memory_format=cl)
    teacher.eval().requires_grad_(False)
    student = create_model(student_arch, num_classes=NUM_CLASSES, in_channels=CHANNELS).to(dev, memory_format=cl)
    generator = torch.Generator().manual_seed(seed)

    def images() -> torch.Tensor:
        x = torch.randn(batch, CHANNELS, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
        return x.to(dev).contiguous(memory_format=cl)

    if kind in PASS_KINDS:
        model = teacher if kind == "teacher" else student.eval()
        forward, held_images = compiler.function(model), images()

        def inference() -> None:
            with torch.inference_mode(), autocast_for(precision, dev.type):
                forward(held_images, features=kind == "teacher")

        return inference

    info = net_info(student, student_arch, NUM_CLASSES, CHANNELS, IMAGE_SIZE)
    objective = Objective(_method("vanilla" if kind == "student" else method), info,
                          net_info(teacher, teacher_arch, NUM_CLASSES, CHANNELS, IMAGE_SIZE), TermContext(4 * batch, seed=0))
    module = compiler.module(DistillModule(student, objective).to(dev).train())
    optimizer = sgd([p for p in module.parameters() if p.requires_grad], dev, lr=0.05, momentum=0.9, weight_decay=5e-4)
    batches = [Batch(images=images(), labels=torch.randint(0, NUM_CLASSES, (batch,), generator=generator).to(dev),
                     index=torch.arange(i * batch, (i + 1) * batch, device=dev), aug=torch.zeros(batch, 3, device=dev),
                     epoch=0) for i in range(2)]
    teacher_forward = compiler.function(teacher)

    def run_teacher(x: torch.Tensor) -> Any:
        with torch.no_grad(), autocast_for(precision, dev.type):
            return teacher_forward(x, features=True)

    held = [run_teacher(b.images) for b in batches] if kind == "cached" else None
    state = {"i": 0}

    def step() -> torch.Tensor:
        i = state["i"] % len(batches)
        state["i"] += 1
        b = batches[i]
        teacher_out = None if kind == "student" else held[i] if held is not None else run_teacher(b.images)
        with autocast_for(precision, dev.type):
            _, losses = module(b.images, teacher_out, b)
        total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        return total.detach()

    return step


def pass_batch(kind: str, batch: int, device: str) -> int:
    """The batch a kind runs at: the training batch, the cache build's or the evaluation's."""
    from rrd_fast.cache.builder import CPU_BATCH, CUDA_FIRST_BATCH
    from rrd_fast.config import DataConfig

    if kind == "teacher":
        return CUDA_FIRST_BATCH if device == "cuda" else CPU_BATCH
    return DataConfig().eval_batch_size if kind == "eval" else batch


def _time_window(fn: Callable[[], Any], steps: int, device: Any) -> float:
    fn()  # this round's warm-up
    _sync(device)
    began = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return time.perf_counter() - began


def measure_speed(pairs: list[tuple[str, str]], batch_sizes: list[int], precisions: list[str], modes: list[str],
                  rounds: int, steps: int, device: str, project: bool, log: Callable[[str], None],
                  done: Callable[[list[dict[str, Any]]], None] = lambda rows: None) -> list[dict[str, Any]]:
    """Rows of img/s and steps/s (medians of `rounds` windows of `steps` calls), one per kind and variant."""
    import torch

    dev = torch.device(device)
    kinds = STEP_KINDS + (PASS_KINDS if project else ())
    rows: list[dict[str, Any]] = []
    for teacher, student in pairs:
        for batch in batch_sizes:
            for precision in precisions:
                variants = []
                for kind in kinds:
                    size = pass_batch(kind, batch, device)
                    for variant in [EAGER, *modes]:
                        row = {"pair": f"{teacher}:{student}", "batch": batch, "pass_batch": size,
                               "precision": precision, "kind": kind, "variant": variant, "compiled": variant != EAGER}
                        try:
                            fn = build_step(kind, teacher, student, size, precision, variant, device=device)
                            began = time.perf_counter()
                            fn()  # the first call compiles
                            _sync(dev)
                            row["first_step_s"] = time.perf_counter() - began
                            variants.append((row, fn, []))
                            log(f"built {row['pair']} b{batch} {precision} {kind} {variant} "
                                f"(first call {row['first_step_s']:.1f} s)")
                        except Exception as exc:  # noqa: BLE001 - a mode this machine cannot run is a finding
                            row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                            log(f"failed {row['pair']} b{batch} {precision} {kind} {variant}: {row['error']}")
                        rows.append(row)
                for _ in range(rounds):
                    for row, fn, samples in variants:
                        samples.append(_time_window(fn, steps, dev))
                for row, fn, samples in variants:
                    seconds = statistics.median(samples) / steps
                    row["steps_per_s"], row["images_per_s"] = 1 / seconds, row["pass_batch"] / seconds
                done(rows)
    return rows


def project(rows: list[dict[str, Any]], epochs: int, train_samples: int, test_samples: int,
            views: int) -> list[dict[str, Any]]:
    """Wall time of a full run from the measured rates, per pair, batch, precision and variant.

    cached run = cache build (views x train_samples teacher passes) + epochs x (train_samples // batch)
    cached steps + epochs x test_samples evaluated + the first calls (compile: the step, the build's
    pass, evaluation); online run = the same steps with the teacher online + evaluation + the first calls.
    """
    out = []
    groups = dict.fromkeys((r["pair"], r["batch"], r["precision"], r["variant"]) for r in rows)  # in measured order
    for pair, batch, precision, variant in groups:
        got = {r["kind"]: r for r in rows if (r["pair"], r["batch"], r["precision"], r["variant"]) == (pair, batch, precision, variant)}
        if any(k not in got or "images_per_s" not in got[k] for k in ("online", "cached", "teacher", "eval")):
            continue
        steps = epochs * (train_samples // batch)
        build = views * train_samples / got["teacher"]["images_per_s"]
        evaluation = epochs * test_samples / got["eval"]["images_per_s"]
        first = {k: got[k]["first_step_s"] if got[k]["compiled"] else 0.0 for k in got}
        # The online step's first call compiles the step graph the cached run also needs (the cached variant
        # found it in the kernel cache), plus the teacher at the training batch: a slight over-count.
        compile_s = first["online"] + first["teacher"] + first["eval"]
        train = steps / got["cached"]["steps_per_s"]
        out.append({"pair": pair, "batch": batch, "precision": precision, "variant": variant, "epochs": epochs,
                    "train_steps": steps, "cache_build_s": build, "train_cached_s": train, "eval_s": evaluation,
                    "compile_s": compile_s, "cached_total_s": build + train + evaluation + compile_s,
                    "online_total_s": steps / got["online"]["steps_per_s"] + evaluation + first["online"] + first["eval"]})
    return out


def measure_trajectory(teacher: str, student: str, batch: int, steps: int, device: str, mode: str) -> dict[str, float]:
    """Largest |compiled - eager| / |eager| of the step loss over `steps` steps, per method (fp32)."""
    out = {}
    for name in TRAJECTORY_METHODS:
        eager = build_step("cached", teacher, student, batch, "fp32", EAGER, method=name, device=device)
        compiled = build_step("cached", teacher, student, batch, "fp32", mode, method=name, device=device)
        worst = 0.0
        for _ in range(steps):
            a, b = float(eager()), float(compiled())
            worst = max(worst, abs(b - a) / max(abs(a), 1e-30))
        out[name] = worst
    return out


def start_up(student: str, batch: int, cache_dir: Path, device: str, mode: str) -> tuple[float, float]:
    """Seconds of a fresh process's first compiled student step: with an empty Inductor cache (a sweep's
    first run), then with the cache that run left (every later run)."""
    code = ("import time; from rrd_fast.bench.compiled import build_step, _sync; import torch; "
            f"s = build_step('student', '{student}', '{student}', {batch}, 'fp32', '{mode}', device='{device}'); "
            f"t = time.perf_counter(); s(); _sync(torch.device('{device}')); print(time.perf_counter() - t)")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir)}
    times = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        times.append(float(proc.stdout.strip().splitlines()[-1]))
    return times[0], times[1]


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def format_report(result: dict[str, Any]) -> str:
    modes = result["modes"]
    rate = "steps/s" if result["device"] == "cuda" else "img/s"
    key = "steps_per_s" if rate == "steps/s" else "images_per_s"
    lines = [f"{result['machine_name']}, device {result['device']}, threads {result['threads']}, "
             f"load average before: {result['load_before']}, after: {result['load_after']}",
             "| pair | batch | precision | step | eager " + rate + " | "
             + " | ".join(f"compiled {m} {rate} | x eager | compile s" for m in modes) + " | vs student eager |",
             "|---" * (6 + 3 * len(modes)) + "|"]
    rows = result["speed"]

    def find(r: dict[str, Any], **want: Any) -> dict[str, Any] | None:
        keys = ("pair", "batch", "precision", "kind", "variant")
        return next((x for x in rows if all(x[k] == want.get(k, r[k]) for k in keys)), None)

    def figure(x: dict[str, Any] | None) -> str:
        return "failed" if x is None or key not in x else f"{x[key]:.1f}" if rate == "img/s" else f"{x[key]:.2f}"

    for r in rows:
        if r["variant"] != EAGER:
            continue
        cells = [r["pair"], str(r["batch"] if r["kind"] in STEP_KINDS else f"{r['pass_batch']} ({r['kind']} pass)"),
                 r["precision"], r["kind"], figure(r)]
        for m in modes:
            c = find(r, variant=m)
            ok = c is not None and key in c and key in r
            cells += [figure(c), f"{c[key] / r[key]:.2f}" if ok else "-", f"{c['first_step_s']:.1f}" if ok else "-"]
        base = find(r, kind="student")
        cells.append(f"{r['images_per_s'] / base['images_per_s']:.2f}"
                     if r["kind"] in STEP_KINDS and base and "images_per_s" in base and "images_per_s" in r else "-")
        lines.append("| " + " | ".join(cells) + " |")
    errors = [r for r in rows if "error" in r]
    for r in errors:
        lines.append(f"failed: {r['pair']} b{r['batch']} {r['precision']} {r['kind']} {r['variant']}: {r['error']}")
    if result.get("projection"):
        p0 = result["projection"][0]
        lines += [f"projected full run ({p0['epochs']} epochs, {result['train_samples']} training and "
                  f"{result['test_samples']} test images, {result['views']}-view cache):",
                  "| pair | batch | precision | variant | cache build | training (cached) | evaluation | compile | "
                  "total, cached teacher | total, online teacher |", "|---" * 10 + "|"]
        for p in result["projection"]:
            lines.append(f"| {p['pair']} | {p['batch']} | {p['precision']} | {p['variant']} | {_duration(p['cache_build_s'])} | "
                         f"{_duration(p['train_cached_s'])} | {_duration(p['eval_s'])} | {p['compile_s']:.0f} s | "
                         f"{_duration(p['cached_total_s'])} | {_duration(p['online_total_s'])} |")
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
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--models", nargs="+", default=["resnet32x4:resnet8x4", "resnet56:resnet20"],
                        metavar="TEACHER:STUDENT")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 256])
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    parser.add_argument("--modes", nargs="+", default=["default"], choices=["default", "reduce-overhead", "max-autotune"],
                        help="compile modes, each a variant beside eager (the last two need CUDA)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed window")
    parser.add_argument("--project", action="store_true",
                        help="also time the cache build's and evaluation's passes and project a full run")
    parser.add_argument("--epochs", type=int, default=240, help="projected run: epochs")
    parser.add_argument("--train-samples", type=int, default=50000, help="projected run: training images")
    parser.add_argument("--test-samples", type=int, default=10000, help="projected run: test images per evaluation")
    parser.add_argument("--views", type=int, default=32, help="projected run: teacher cache views")
    parser.add_argument("--trajectory-steps", type=int, default=50, help="0: skip the trajectory check")
    parser.add_argument("--no-start-up", action="store_true", help="skip the fresh-process start-up measurement")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")


def _check_arguments(args: argparse.Namespace) -> None:
    import torch

    from rrd_fast.cli import RunError

    if args.device == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda: no CUDA device is visible to this torch")
    if args.device == "cpu" and set(args.modes) - {"default"}:
        raise RunError(f"--modes {' '.join(args.modes)}: reduce-overhead and max-autotune need --device cuda")
    for name in ("rounds", "steps", "epochs", "train_samples", "test_samples", "views"):
        if getattr(args, name) <= 0:
            raise RunError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if any(b <= 0 for b in args.batch_sizes):
        raise RunError(f"--batch-sizes must be positive, got {args.batch_sizes}")


def command(args: argparse.Namespace) -> int:
    import torch

    from rrd_fast.bench.train import parse_pairs

    _check_arguments(args)
    pairs = parse_pairs(args.models)
    # One group holds every kind compiled in every mode at once (three DistillModules per mode), more than
    # dynamo's default limit of 8 per function, past which it would silently time eager code.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    result: dict[str, Any] = {"machine": machine_info(), "machine_name": machine_name(torch.device(args.device)),
                              "device": args.device, "modes": args.modes, "threads": torch.get_num_threads(),
                              "load_before": load_average(), "train_samples": args.train_samples,
                              "test_samples": args.test_samples, "views": args.views}

    def done(rows: list[dict[str, Any]]) -> None:
        result["speed"] = rows
        if args.project:
            result["projection"] = project(rows, args.epochs, args.train_samples, args.test_samples, args.views)
        if args.out:
            write_json(args.out, result)

    with tempfile.TemporaryDirectory() as cache:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(cache) / "inductor"))
        measure_speed(pairs, args.batch_sizes, args.precisions, args.modes, args.rounds, args.steps, args.device,
                      args.project, log, done)
        teacher, student = pairs[0]
        if args.trajectory_steps:
            result["trajectory"] = measure_trajectory(teacher, student, args.batch_sizes[0], args.trajectory_steps,
                                                      args.device, args.modes[0])
            result["trajectory_steps"] = args.trajectory_steps
        if not args.no_start_up:
            result["start_up_s"] = start_up(student, args.batch_sizes[0], Path(cache) / "start-up", args.device,
                                            args.modes[0])
    result["load_after"] = load_average()
    print(format_report(result))
    if args.out:
        write_json(args.out, result)
    return 0
