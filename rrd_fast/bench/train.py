"""Training-speed benchmark: where a distillation step's time goes, side by side in one run.

    python -m rrd_fast.bench train [--quick] [--models resnet32x4:resnet8x4 resnet56:resnet20]
                                   [--batch-sizes 64 256] [--precisions fp32 bf16] [--out bench.json]

For every teacher:student pair, batch size and precision (fp32, or bf16 autocast), all
in channels_last as the trainer runs by default:
  (a) the student alone, forward + backward + SGD step with CE, on batches already in
      memory: the limit a distillation step can approach;
  (b) the full distillation step: a batch from the torch pipeline, the online teacher
      under no_grad, `DistillModule` with the RRD+KD `Objective` (gamma=alpha=beta=1),
      backward and SGD step;
and for every batch size, on 50k CIFAR-sized images with pad-4 crop + flip + normalise:
  (c) the torch array pipeline alone, with the process's torch threads and with one
      thread (on a busy shared machine, each parallel region of a small op can wait
      milliseconds for a core under OpenMP's default wait policy; one thread isolates
      the pipeline's own cost);
  (d) a per-sample Python `DataLoader` doing the same augmentation image by image with
      Pillow, as RepDistiller's torchvision transforms do.
All variants are built once and timed in interleaved rounds (the machine may be shared);
figures are medians over rounds. Ratios: b/a, c/d, and the pipeline's share of the step,
(c time per batch) / (b time per batch).

Levers read at process start are measured in fresh processes, in rotating order: the
glibc malloc tunables (rrd_fast/malloc_tuning.py) and OMP_WAIT_POLICY=PASSIVE, alone and
together. The main measurement runs with the malloc tunables, as training does.
`--quick` measures batch 64 only (RepDistiller's CIFAR batch) with fewer rounds and one
fresh process per lever, so that it takes minutes, not tens of minutes.
Models get random weights: timing does not depend on them.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from rrd_fast.bench.common import (CHANNELS, CIFAR100, CIFAR_MEAN, CIFAR_STD, IMAGE_SIZE, NUM_CLASSES, load_average,
                                   machine_info, per_sample_loader, write_json)
from rrd_fast.cli import RunError
from rrd_fast.malloc_tuning import OPT_OUT_VAR, TUNABLES, TUNABLES_VAR

HELP = "student limit, full distillation step, torch pipeline, per-sample baseline"
PRECISIONS = ("fp32", "bf16")
DEFAULT_PAIRS = ("resnet32x4:resnet8x4", "resnet56:resnet20")
DEFAULT_BATCH_SIZES = (64, 256)
QUICK_BATCH_SIZES = (64,)
TARGET_PIPELINE_IPS = 150_000
TARGET_PIPELINE_VS_BASELINE = 30.0
TARGET_PIPELINE_SHARE = 0.03


@dataclass(frozen=True)
class Effort:
    """How long each measurement runs; `--quick` trades precision for minutes."""

    rounds: int
    warmup_steps: int
    steps: int  # training steps per timed window
    pipeline_batches: int  # (c) batches per window
    loader_batches: int  # (d) batches per window
    lever_repeats: int  # fresh processes per lever in the start-up settings comparison
    lever_rounds: int


FULL = Effort(rounds=7, warmup_steps=2, steps=3, pipeline_batches=60, loader_batches=12, lever_repeats=3, lever_rounds=3)
QUICK = Effort(rounds=3, warmup_steps=1, steps=1, pipeline_batches=20, loader_batches=4, lever_repeats=1, lever_rounds=1)


# ---------------------------------------------------------------------------------------
# variants: each owns its state, `run(steps)` does the work, `images` per step
# ---------------------------------------------------------------------------------------

@dataclass
class Variant:
    """`run(steps)` does `steps` steps; it may return the seconds of the part to count (else all is timed)."""

    key: dict[str, Any]
    images: int
    run: Callable[[int], float | None]
    samples: list[float] = field(default_factory=list)  # img/s per timed window

    def time_window(self, steps: int) -> None:
        start = time.perf_counter()
        counted = self.run(steps)
        elapsed = time.perf_counter() - start if counted is None else counted
        self.samples.append(steps * self.images / elapsed)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")


def autocast_for(precision: str, device_type: str = "cpu") -> contextlib.AbstractContextManager:
    import torch

    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cifar_like(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-100-shaped uint8 images and labels (random pixels: speed does not depend on them)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8), rng.integers(0, NUM_CLASSES, size=n)


def array_pipeline(images: np.ndarray, labels: np.ndarray, sampler: Any) -> Any:
    """The trainer's torch pipeline over in-memory CIFAR-100-shaped arrays (pad-4 crop, flip, normalise)."""
    from pipelines.augment import CropFlipSpec
    from pipelines.backends import build_pipeline
    from pipelines.formats import ArraySplit

    split = ArraySplit(images, labels, [str(c) for c in range(NUM_CLASSES)])
    return build_pipeline("torch", split, CIFAR100, sampler, CropFlipSpec(pad=4, flip=True))


def endless_batches(pipe: Any, sampler: Any) -> Iterator[Any]:
    """`pipe.epoch` for another batch size: the same storage, indices from `sampler`."""
    for epoch in itertools.count():
        for index in sampler.batches(epoch):
            yield pipe.batch_for(index, epoch)


def student_step(arch: str, batch: int, precision: str, pipe: Any, sampler: Any) -> Callable[[int], None]:
    """(a): the student alone with CE on a few batches generated once and kept in memory."""
    import torch
    import torch.nn.functional as F

    from rrd_fast.models import create_model

    model = create_model(arch, num_classes=NUM_CLASSES, in_channels=CHANNELS).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    source = endless_batches(pipe, sampler)
    held = [next(source) for _ in range(2)]
    batches = [(b.images.contiguous(memory_format=torch.channels_last), b.labels) for b in held]
    state = {"i": 0}

    def run(steps: int) -> None:
        for _ in range(steps):
            images, labels = batches[state["i"] % len(batches)]
            state["i"] += 1
            with autocast_for(precision):
                logits = model(images)
            loss = F.cross_entropy(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return run


def distill_step(teacher_arch: str, student_arch: str, batch: int, precision: str, pipe: Any, sampler: Any,
                 num_train: int) -> Callable[[int], None]:
    """(b): pipeline batch -> online teacher -> DistillModule with RRD+KD -> backward -> SGD step."""
    import torch

    from rrd_fast.config import MethodConfig
    from rrd_fast.methods import Objective, TermContext
    from rrd_fast.models import create_model
    from rrd_fast.trainer import DistillModule, net_info

    cl = torch.channels_last
    teacher = create_model(teacher_arch, num_classes=NUM_CLASSES, in_channels=CHANNELS).to(memory_format=cl)
    teacher.eval().requires_grad_(False)
    student = create_model(student_arch, num_classes=NUM_CLASSES, in_channels=CHANNELS)
    method = MethodConfig(name="rrd", gamma=1.0, alpha=1.0, beta=1.0)
    objective = Objective(method, net_info(student, student_arch, NUM_CLASSES, CHANNELS, IMAGE_SIZE),
                          net_info(teacher, teacher_arch, NUM_CLASSES, CHANNELS, IMAGE_SIZE), TermContext(num_train, seed=0))
    module = DistillModule(student.to(memory_format=cl), objective).train()
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
    source = endless_batches(pipe, sampler)

    def run(steps: int) -> None:
        for _ in range(steps):
            batch_ = next(source)
            images = batch_.images.contiguous(memory_format=cl)
            with torch.no_grad(), autocast_for(precision):
                teacher_out = teacher(images, features=True)
            with autocast_for(precision):
                _, losses = module(images, teacher_out, batch_)
            total = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()

    return run


def pipeline_batches(pipe: Any, sampler: Any, threads: int = 0) -> Callable[[int], None]:
    """(c): the torch pipeline alone, with the process's torch threads or with `threads`.

    One thread isolates the pipeline's own cost from OpenMP scheduling: on a busy shared
    machine a parallel region waits for a core, which multi-threaded small ops feel most.
    """
    import torch

    source = endless_batches(pipe, sampler)

    def run(steps: int) -> None:
        previous = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            for _ in range(steps):
                next(source)
        finally:
            torch.set_num_threads(previous)

    return run


class PerSampleCifar:
    """(d)'s dataset: RepDistiller's torchvision recipe, one PIL image at a time.

    RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize, with torch's
    RNG drawn per sample, as torchvision does (torchvision itself is not installed here).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, pad: int = 4) -> None:
        self.images, self.labels, self.pad = images, labels, pad
        self.mean = None
        self.std = None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        import torch
        from PIL import Image, ImageOps

        if self.mean is None:
            self.mean = torch.tensor(CIFAR_MEAN).view(3, 1, 1)
            self.std = torch.tensor(CIFAR_STD).view(3, 1, 1)
        img = Image.fromarray(self.images[i])
        h, w = img.height, img.width
        img = ImageOps.expand(img, border=self.pad, fill=0)
        top = int(torch.randint(0, 2 * self.pad + 1, (1,)))
        left = int(torch.randint(0, 2 * self.pad + 1, (1,)))
        img = img.crop((left, top, left + w, top + h))
        if float(torch.rand(1)) < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()
        x = x.float().div(255).sub_(self.mean).div_(self.std)
        return x, int(self.labels[i])


def loader_batches(images: np.ndarray, labels: np.ndarray, batch: int, workers: int) -> Callable[[int], float]:
    """(d): a per-sample DataLoader, timed from a fresh pass's start to its `steps`-th batch.

    Workers are started before and stopped after the timed part (as once per epoch in a
    real run), so no batch is prefetched for free and no worker competes with the other
    variants while they are timed.
    """
    loader = per_sample_loader(PerSampleCifar(images, labels), batch, workers)

    def run(steps: int) -> float:
        it = iter(loader)  # forks the workers; they start on the first batches right away
        start = time.perf_counter()
        for _ in range(steps):
            next(it)
        elapsed = time.perf_counter() - start
        del it  # joins the workers
        return elapsed

    return run


# ---------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------

def interleave(variants: Sequence[Variant], rounds: int, steps_of: Callable[[Variant], int], log: Callable[[str], None]) -> None:
    """Every round times every variant once; odd rounds run them in reverse to cancel drift."""
    for r in range(rounds):
        order = variants if r % 2 == 0 else list(reversed(variants))
        for v in order:
            v.time_window(steps_of(v))
        log(f"round {r + 1}/{rounds} done")


def parse_pairs(specs: Sequence[str]) -> list[tuple[str, str]]:
    from rrd_fast.models import create_model

    pairs = []
    for spec in specs:
        teacher, sep, student = spec.partition(":")
        if not sep or not teacher or not student:
            raise RunError(f"--models: {spec!r} is not TEACHER:STUDENT (e.g. resnet32x4:resnet8x4)")
        for name in (teacher, student):
            create_model(name, num_classes=NUM_CLASSES)  # unknown names fail here, with suggestions
        pairs.append((teacher, student))
    return pairs


# Process-start settings compared in fresh processes: name -> variables set (all others removed).
OMP_PASSIVE = {"OMP_WAIT_POLICY": "PASSIVE"}
LEVERS: dict[str, dict[str, str]] = {
    "baseline": {OPT_OUT_VAR: "1"},
    "malloc": {TUNABLES_VAR: TUNABLES},
    "omp_passive": {OPT_OUT_VAR: "1", **OMP_PASSIVE},
    "malloc+omp_passive": {TUNABLES_VAR: TUNABLES, **OMP_PASSIVE},
}
LEVER_VARS = (TUNABLES_VAR, OPT_OUT_VAR, "OMP_WAIT_POLICY")


def run_lever_comparison(student: str, batch: int, effort: Effort, threads: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Environment levers read only at process start (glibc malloc tunables, OpenMP's wait policy).

    Each repeat starts one fresh process per lever, in rotating order, and times the
    student step (a) in it; the figure per lever is the median over repeats.
    """
    base = {k: v for k, v in os.environ.items() if k not in LEVER_VARS}
    cmd = [sys.executable, "-m", "rrd_fast.bench", "probe", "--student", student, "--batch-size", str(batch),
           "--rounds", str(effort.lever_rounds), "--steps", str(effort.steps), "--warmup", str(effort.warmup_steps),
           "--threads", str(threads)]
    names = list(LEVERS)
    results: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(effort.lever_repeats):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            proc = subprocess.run(cmd, env={**base, **LEVERS[name]}, capture_output=True, text=True, timeout=1800)
            if proc.returncode != 0:
                raise RunError(f"probe with {name} settings failed: {proc.stderr.strip().splitlines()[-1:]}")
            results[name].append(float(json.loads(proc.stdout.strip().splitlines()[-1])["images_per_s"]))
            log(f"probe {name}: {results[name][-1]:.1f} img/s")
    medians = {name: statistics.median(v) for name, v in results.items()}
    return {"student": student, "batch_size": batch, "precision": "fp32", "measure": "student step (a), fresh process",
            "img_s": medians, "speedup_vs_baseline": {n: m / medians["baseline"] for n, m in medians.items()},
            "samples": results, "settings": LEVERS}


def measure(pairs: list[tuple[str, str]], batch_sizes: list[int], precisions: list[str], effort: Effort,
            n_images: int, loader_workers: int, log: Callable[[str], None]) -> dict[str, Any]:
    import torch

    from pipelines.sampler import EpochSampler

    images, labels = cifar_like(n_images)
    samplers = {b: EpochSampler(n_images, b, seed=0) for b in batch_sizes}
    pipe = array_pipeline(images, labels, samplers[batch_sizes[0]])

    torch.manual_seed(0)
    train: list[Variant] = []
    for (teacher, student), b, prec in itertools.product(pairs, batch_sizes, precisions):
        key = {"teacher": teacher, "student": student, "batch_size": b, "precision": prec}
        train.append(Variant({**key, "kind": "a"}, b, student_step(student, b, prec, pipe, samplers[b])))
        train.append(Variant({**key, "kind": "b"}, b, distill_step(teacher, student, b, prec, pipe, samplers[b], n_images)))
    data = [Variant({"batch_size": b, "kind": "c"}, b, pipeline_batches(pipe, samplers[b])) for b in batch_sizes]
    data += [Variant({"batch_size": b, "kind": "c1"}, b, pipeline_batches(pipe, samplers[b], threads=1)) for b in batch_sizes]
    data += [Variant({"batch_size": b, "kind": "d"}, b, loader_batches(images, labels, b, loader_workers)) for b in batch_sizes]

    log(f"warm-up: {len(train)} training variants, {len(data)} data variants")
    for v in train:
        v.run(effort.warmup_steps)
    for v in data:
        v.run(2)
    windows = {"a": effort.steps, "b": effort.steps, "c": effort.pipeline_batches, "c1": effort.pipeline_batches,
               "d": effort.loader_batches}
    # Data variants sit between training variants, so all see the same background load.
    interleave(train + data, effort.rounds, lambda v: windows[v.key["kind"]], log)

    rows = []
    by_key = {tuple(sorted(v.key.items())): v for v in train + data}

    def get(kind: str, **key: Any) -> Variant:
        return by_key[tuple(sorted({**key, "kind": kind}.items()))]

    for (teacher, student), b, prec in itertools.product(pairs, batch_sizes, precisions):
        key = {"teacher": teacher, "student": student, "batch_size": b, "precision": prec}
        a, bb = get("a", **key), get("b", **key)
        c, c1 = get("c", batch_size=b), get("c1", batch_size=b)
        # share = (c time per batch) / (b time per batch) = b img/s / c img/s
        rows.append({**key, "a_img_s": a.median, "b_img_s": bb.median, "b_over_a": bb.median / a.median,
                     "pipeline_share": bb.median / c.median, "pipeline_share_1thread": bb.median / c1.median,
                     "a_samples": a.samples, "b_samples": bb.samples})
    pipeline = []
    for b in batch_sizes:
        c, c1, d = get("c", batch_size=b), get("c1", batch_size=b), get("d", batch_size=b)
        pipeline.append({"batch_size": b, "c_img_s": c.median, "c_1thread_img_s": c1.median, "d_img_s": d.median,
                         "c_over_d": c.median / d.median, "c_1thread_over_d": c1.median / d.median,
                         "c_samples": c.samples, "c_1thread_samples": c1.samples, "d_samples": d.samples})
    return {"train": rows, "pipeline": pipeline}


# ---------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------

def format_report(result: dict[str, Any], show_targets: bool = False) -> str:
    m = result["machine"]
    lines = [f"torch {m['torch']}, {m['torch_threads']} threads on {m['cpu_count']} CPUs, "
             f"GLIBC_TUNABLES {'set' if m['glibc_tunables'] else 'unset'}, OMP_WAIT_POLICY {m['omp_wait_policy'] or 'unset'}, "
             f"load average {m['load_average_start'][0]:.1f} -> {m['load_average_end'][0]:.1f}"
             if m.get("load_average_start") else f"torch {m['torch']}, {m['torch_threads']} threads"]
    lines.append(f"CPU capability {m['cpu_capability']}, native bf16 {'yes' if m['bf16_native'] else 'NO (bf16 autocast is emulated)'}; "
                 "medians over interleaved rounds, img/s; all channels_last")
    lines.append("")
    threads = m["torch_threads"]
    head = (f"{'teacher -> student':26s} {'batch':>5s} {'prec':>5s} {'(a) student':>12s} {'(b) distill':>12s} {'b/a':>6s} "
            f"{'pipe share':>10s} {'(1 thread)':>10s}")
    lines += [head, "-" * len(head)]
    for r in result["train"]:
        lines.append(f"{r['teacher'] + ' -> ' + r['student']:26s} {r['batch_size']:5d} {r['precision']:>5s} "
                     f"{r['a_img_s']:12.1f} {r['b_img_s']:12.1f} {r['b_over_a']:6.2f} {100 * r['pipeline_share']:9.3f}% "
                     f"{100 * r['pipeline_share_1thread']:9.3f}%")
    lines.append("")
    head = (f"{'data: ' + str(result['config']['images']) + ' x 32x32, crop+flip+norm':34s} {'batch':>5s} "
            f"{'(c) torch':>10s} {'c, 1 thread':>11s} {'(d) per-sample':>14s} {'c/d':>7s} {'c1/d':>7s}")
    lines += [head, "-" * len(head)]
    for p in result["pipeline"]:
        lines.append(f"{'':34s} {p['batch_size']:5d} {p['c_img_s']:10.0f} {p['c_1thread_img_s']:11.0f} {p['d_img_s']:14.0f} "
                     f"{p['c_over_d']:7.1f} {p['c_1thread_over_d']:7.1f}")
    lines.append(f"(c): {threads} torch threads unless marked; (d): {result['config']['loader_workers']} DataLoader worker processes")
    lv = result.get("levers")
    if lv:
        lines.append("")
        lines.append(f"start-up levers, {lv['student']} student step (a), batch {lv['batch_size']}, fp32, fresh processes:")
        for name, ips in lv["img_s"].items():
            lines.append(f"  {name:20s} {ips:10.1f} img/s  {lv['speedup_vs_baseline'][name]:5.2f}x")
    if not show_targets:
        return "\n".join(lines)
    t = result["targets"]
    lines.append("")
    lines.append(f"targets: (c) >= {t['pipeline_img_s']:,} img/s: {'met' if t['pipeline_img_s_met'] else 'NOT met'}; "
                 f"c/d >= {t['c_over_d']:.0f}: {'met' if t['c_over_d_met'] else 'NOT met'}; "
                 f"pipeline share < {100 * t['share']:.0f}%: {'met' if t['share_met'] else 'NOT met'}")
    return "\n".join(lines)


def targets(result: dict[str, Any]) -> dict[str, Any]:
    pipe, train = result["pipeline"], result["train"]
    return {
        "pipeline_img_s": TARGET_PIPELINE_IPS,
        "pipeline_img_s_met": all(p["c_img_s"] >= TARGET_PIPELINE_IPS for p in pipe),
        "c_over_d": TARGET_PIPELINE_VS_BASELINE,
        "c_over_d_met": all(p["c_over_d"] >= TARGET_PIPELINE_VS_BASELINE for p in pipe),
        "share": TARGET_PIPELINE_SHARE,
        "share_met": all(r["pipeline_share"] < TARGET_PIPELINE_SHARE for r in train),
    }


# ---------------------------------------------------------------------------------------
# entry points (`python -m rrd_fast.bench train` and the internal `probe`)
# ---------------------------------------------------------------------------------------

def command(args: argparse.Namespace) -> int:
    """`python -m rrd_fast.bench train`: measure, print the tables, optionally write JSON."""
    import torch

    for prec in args.precisions:
        if prec not in PRECISIONS:
            raise RunError(f"--precisions: {prec!r} is not one of {', '.join(PRECISIONS)}")
    batch_sizes = list(args.batch_sizes or (QUICK_BATCH_SIZES if args.quick else DEFAULT_BATCH_SIZES))
    if any(b <= 0 for b in batch_sizes):
        raise RunError(f"--batch-sizes: batch sizes must be positive, got {batch_sizes}")
    if args.threads:
        torch.set_num_threads(args.threads)
    pairs = parse_pairs(args.models)
    effort = QUICK if args.quick else FULL
    n_images = args.images
    if n_images < max(batch_sizes):
        raise RunError(f"--images: {n_images} images is fewer than one batch of {max(batch_sizes)}")

    def log(msg: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    started = time.time()
    result: dict[str, Any] = {
        "benchmark": "rrd_fast.bench train",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": {"pairs": [f"{t}:{s}" for t, s in pairs], "batch_sizes": batch_sizes, "precisions": args.precisions,
                   "quick": args.quick, "effort": effort.__dict__, "images": n_images, "loader_workers": args.loader_workers,
                   "channels_last": True, "method": "rrd gamma=1 alpha=1 beta=1 (RRD+KD), paper preset, queue 16384"},
    }
    result.update(measure(pairs, batch_sizes, args.precisions, effort, n_images, args.loader_workers, log))
    if not args.no_levers:
        result["levers"] = run_lever_comparison(pairs[0][1], max(batch_sizes), effort, args.threads, log)
    result["machine"]["load_average_end"] = load_average()
    result["wall_s"] = time.time() - started
    result["targets"] = targets(result)
    print(format_report(result, show_targets=args.targets))
    if args.out:
        write_json(args.out, result)
        print(f"wrote {args.out}")
    return 0


def probe_command(args: argparse.Namespace) -> int:
    """One fresh process: median img/s of the student step, under whatever settings it started with."""
    from pipelines.sampler import EpochSampler

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    images, labels = cifar_like(max(4 * args.batch_size, 1024))
    sampler = EpochSampler(len(images), args.batch_size, seed=0)
    pipe = array_pipeline(images, labels, sampler)
    v = Variant({}, args.batch_size, student_step(args.student, args.batch_size, "fp32", pipe, sampler))
    v.run(args.warmup)
    for _ in range(args.rounds):
        v.time_window(args.steps)
    print(json.dumps({"images_per_s": v.median, "samples": v.samples, "glibc_tunables": os.environ.get(TUNABLES_VAR, ""),
                      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}))
    return 0


def add_arguments(train: argparse.ArgumentParser) -> None:
    train.add_argument("--quick", action="store_true",
                       help="batch 64 only unless --batch-sizes is given, fewer and shorter rounds (a minute or two, noisier)")
    train.add_argument("--models", nargs="+", default=list(DEFAULT_PAIRS), metavar="TEACHER:STUDENT")
    train.add_argument("--batch-sizes", nargs="+", type=int, default=None,
                       help=f"default: {' '.join(map(str, DEFAULT_BATCH_SIZES))} "
                            f"({' '.join(map(str, QUICK_BATCH_SIZES))} with --quick)")
    train.add_argument("--precisions", nargs="+", default=list(PRECISIONS), help="fp32 and/or bf16 (CPU autocast)")
    train.add_argument("--images", type=int, default=50_000, help="images in the in-memory split (CIFAR: 50000)")
    train.add_argument("--loader-workers", type=int, default=2, help="worker processes of the per-sample baseline (d)")
    train.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    train.add_argument("--no-levers", action="store_true",
                       help="skip the fresh-process comparison of GLIBC_TUNABLES and OMP_WAIT_POLICY")
    train.add_argument("--targets", action="store_true", help="also print whether the development targets are met")
    train.add_argument("--out", type=Path, help="write all figures and samples as JSON here")


def add_probe_arguments(probe: argparse.ArgumentParser) -> None:
    probe.add_argument("--student", default="resnet8x4")
    probe.add_argument("--batch-size", type=int, default=256)
    probe.add_argument("--rounds", type=int, default=3)
    probe.add_argument("--steps", type=int, default=2)
    probe.add_argument("--warmup", type=int, default=1)
    probe.add_argument("--threads", type=int, default=0)
