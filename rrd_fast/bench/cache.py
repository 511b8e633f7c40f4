"""Teacher-cache benchmark: what distilling from the cache costs next to its alternatives.

    python -m rrd_fast.bench cache [--quick] [--work DIR] [--only throughput|build|rss|gather ...]

throughput  For resnet32x4->resnet8x4 and wrn_40_2->wrn_16_2, fp32 and bf16 autocast,
            batch 64 and 256 (channels_last, as the trainer runs), side by side in
            interleaved rounds (the machine may be shared), medians of img/s:
              student   student alone, CE, batches held in memory (`train`'s (a)): the limit;
              online    pipeline batch + online teacher + RRD+KD step (`train`'s (b));
              cached    the same step with the teacher read from the cache through the
                        trainer's own path (ViewPipeline prefetch + CachedTeacher).
build       Cache build time (the teacher over V=2 views of 256 synthetic CIFAR-100 images,
            each precision) and size on disk per view, also extrapolated to 50k samples.
rss         Peak RSS of a fresh process reading every batch of every view through the real
            reader, for a 0.43 GB and a 2.58 GB cache (fp32, 50k rows of 2148 values), with
            anonymous and file-backed (page-cache) resident memory reported apart.
gather      Row-gather methods on a 50k-row fp16 shard (why the reader uses np.take on mmap).
Finally the arithmetic for CIFAR-100 at paper scale (V=32 × 50k) from BRIEF §4 FLOPs.
Models get random weights: timing does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rrd_fast.bench.common import CHANNELS, CIFAR_MEAN, CIFAR_STD, IMAGE_SIZE, NUM_CLASSES, load_average, machine_info, write_json

HELP = "student-only vs online teacher vs cache throughput, build cost, RSS"
PAIRS = (("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"))
PRECISIONS = ("fp32", "bf16")
BATCHES = (64, 256)
BENCH_SAMPLES = 256
BENCH_VIEWS = 2
# BRIEF §4: forward GFLOP per 32×32 image, pooled dim; CIFAR-100 has 100 classes.
PAPER_MODELS = {"resnet32x4": (2.17, 256), "wrn_40_2": (0.66, 128)}
H200_BF16_DENSE_TFLOPS = 989.0  # H200 SXM dense bf16 tensor-core peak (same chip as H100 SXM)
ASSUMED_MFU = 0.15  # small 32×32 CNNs in inference are far from peak; 15% is a typical figure for such nets


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _overrides(work: Path, teacher: str, student: str, precision: str, batch: int) -> list[str]:
    return [f"data.root={work / 'data'}", f"data.batch_size={batch}", f"student.arch={student}",
            f"teacher.checkpoint={work / ('teacher-' + teacher)}", f"teacher.cache={work / f'cache-{teacher}-{precision}'}",
            f"teacher.cache_views={BENCH_VIEWS}", "method.name=rrd", "method.alpha=1", "method.beta=1",
            f"train.mixed_precision={'bf16' if precision == 'bf16' else repr('no')}", "train.progress=false"]


def _prepare(work: Path) -> None:
    import torch

    from pipelines.synthetic import write_cifar100
    from rrd_fast.checkpoint import write_model_checkpoint
    from rrd_fast.models import create_model

    if not (work / "data").exists():
        write_cifar100(work / "data", BENCH_SAMPLES, 64)
    for teacher, _ in PAIRS:
        if not (work / f"teacher-{teacher}" / "model.json").exists():
            torch.manual_seed(0)
            write_model_checkpoint(work / f"teacher-{teacher}", create_model(teacher, NUM_CLASSES, CHANNELS),
                                   {"arch": teacher, "num_classes": NUM_CLASSES, "in_channels": CHANNELS,
                                    "image_size": IMAGE_SIZE,
                                    "normalization": {"mean": list(CIFAR_MEAN), "std": list(CIFAR_STD)}})


def run_builds(work: Path) -> list[dict[str, Any]]:
    from rrd_fast.cache.builder import build_cache
    from rrd_fast.config import load_config

    rows = []
    for teacher, student in PAIRS:
        for precision in PRECISIONS:
            cfg = load_config(None, _overrides(work, teacher, student, precision, 64))
            began = time.perf_counter()
            manifest = build_cache(cfg, rebuild=True, device="cpu", log=lambda _: None)
            seconds = time.perf_counter() - began
            size = sum(e["bytes"] for e in manifest["shards"].values())
            per_view = size / BENCH_VIEWS
            rows.append({"teacher": teacher, "precision": precision, "dtype": cfg.teacher.cache_dtype,
                         "passes": BENCH_SAMPLES * BENCH_VIEWS, "seconds": seconds,
                         "img_per_s": BENCH_SAMPLES * BENCH_VIEWS / seconds, "bytes_per_view": per_view,
                         "bytes_per_view_50k": per_view / BENCH_SAMPLES * 50_000})
            _log(f"build {teacher} {precision}: {seconds:.1f} s, {rows[-1]['img_per_s']:.0f} img/s")
    return rows


def _cached_step(cfg: Any, num_train: int) -> tuple[Callable[[int], None], Any]:
    """(c): the trainer's cached path: ViewPipeline prefetch -> CachedTeacher -> RRD+KD step."""
    import itertools

    import torch

    from rrd_fast.bench.train import autocast_for
    from rrd_fast.cache.source import open_cached_teacher
    from rrd_fast.config import MethodConfig
    from rrd_fast.data import build_data
    from rrd_fast.methods import Objective, TermContext
    from rrd_fast.models import create_model
    from rrd_fast.checkpoint import load_teacher
    from rrd_fast.trainer import DistillModule, net_info

    cl = torch.channels_last
    teacher, meta = load_teacher(cfg.teacher.checkpoint, "", NUM_CLASSES, CHANNELS)  # stays on the CPU, never run
    data = build_data(cfg.data, cfg.seed, 0, 1, torch.device("cpu"))
    cached = open_cached_teacher(cfg, teacher, meta, data.train, "cpu", may_build=False)
    pipe = cached.wrap(data.train)
    student = create_model(cfg.student.arch, num_classes=NUM_CLASSES, in_channels=CHANNELS)
    objective = Objective(MethodConfig(name="rrd", gamma=1.0, alpha=1.0, beta=1.0),
                          net_info(student, cfg.student.arch, NUM_CLASSES, CHANNELS, IMAGE_SIZE),
                          net_info(teacher, meta["arch"], NUM_CLASSES, CHANNELS, IMAGE_SIZE), TermContext(num_train, seed=0))
    module = DistillModule(student.to(memory_format=cl), objective).train()
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.05, momentum=0.9, weight_decay=5e-4)
    precision = "bf16" if cfg.train.mixed_precision == "bf16" else "fp32"
    source = (b for e in itertools.count() for b in pipe.epoch(e))

    def run(steps: int) -> None:
        for _ in range(steps):
            batch = next(source)
            images = batch.images.contiguous(memory_format=cl)
            teacher_out = cached(batch, images)
            with autocast_for(precision):
                _, losses = module(images, teacher_out, batch)
            total = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()

    return run, cached


def run_throughput(work: Path, rounds: int) -> list[dict[str, Any]]:
    import torch

    from rrd_fast.bench.train import Variant, distill_step, interleave, student_step
    from rrd_fast.config import load_config
    from rrd_fast.data import build_data

    results = []
    for teacher, student in PAIRS:
        variants: list[Variant] = []
        sources = {}
        for precision in PRECISIONS:
            for batch in BATCHES:
                cfg = load_config(None, _overrides(work, teacher, student, precision, batch))
                data = build_data(cfg.data, cfg.seed, 0, 1, torch.device("cpu"))
                key = {"teacher": teacher, "student": student, "precision": precision, "batch": batch}
                variants.append(Variant({**key, "mode": "student"}, batch,
                                        student_step(student, batch, precision, data.train, data.train.sampler)))
                variants.append(Variant({**key, "mode": "online"}, batch,
                                        distill_step(teacher, student, batch, precision, data.train, data.train.sampler,
                                                     data.num_train)))
                run, cached = _cached_step(cfg, data.num_train)
                variants.append(Variant({**key, "mode": "cached"}, batch, run))
                sources[(precision, batch)] = cached
        steps_of = lambda v: 2 if v.images <= 64 else 1  # noqa: E731
        for v in variants:
            v.run(1)  # warm-up: kernel selection, allocator, first cache view mapped and verified
        for cached in sources.values():
            cached.wait_seconds = 0.0
        interleave(variants, rounds, steps_of, lambda msg: _log(f"{teacher}->{student}: {msg}"))
        for precision in PRECISIONS:
            for batch in BATCHES:
                got = {v.key["mode"]: v for v in variants if v.key["precision"] == precision and v.key["batch"] == batch}
                steps = rounds * (2 if batch <= 64 else 1)
                results.append({"teacher": teacher, "student": student, "precision": precision, "batch": batch,
                                **{f"{m}_img_s": got[m].median for m in ("student", "online", "cached")},
                                "cache_wait_ms_per_step": 1000 * sources[(precision, batch)].wait_seconds / steps})
        for cached in sources.values():
            cached.close()
    return results


def synthesize_cache(cache_dir: Path, num_samples: int, views: int, dims: dict[str, int], dtype: str = "fp32") -> int:
    """A cache of random rows written by the real shard writer (no teacher run); returns its size."""
    import torch

    from rrd_fast.cache.manifest import CACHE_FORMAT, write_manifest
    from rrd_fast.cache.shards import DTYPES, plan_shards, write_shard

    cache_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {
        "key": {"format": CACHE_FORMAT, "dtype": dtype, "views": views, "synthetic": True},
        "fields": list(dims), "tensors": {k: [d] for k, d in dims.items()},
        "layout": {"num_samples": num_samples, "views": views, "samples_per_shard": num_samples},
        "shards": {}, "complete": False,
    }
    gen = torch.Generator().manual_seed(0)
    for i, part in enumerate(plan_shards(num_samples, views, num_samples)):
        tensors = {k: torch.randn(num_samples, d, generator=gen).to(DTYPES[dtype][0]) for k, d in dims.items()}
        entry = write_shard(cache_dir / part["name"], tensors, i)
        manifest["shards"][part["name"]] = {"view": part["view"], "start": 0, "stop": num_samples, **entry}
        del tensors
    manifest["complete"] = True
    write_manifest(cache_dir, manifest)
    return sum(e["bytes"] for e in manifest["shards"].values())


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def rss_child(cache_dir: str, batch: int = 256) -> None:
    """Run in a fresh process: read every batch of every view as training would; print peak memory."""
    import psutil
    import torch

    from pipelines.batch import Batch
    from pipelines.sampler import EpochSampler
    from rrd_fast.cache.manifest import read_manifest
    from rrd_fast.cache.shards import CacheReader
    from rrd_fast.cache.source import CachedTeacher, _Staged

    proc = psutil.Process()
    base = {"rss": proc.memory_info().rss, "anon": _status_kib("RssAnon") * 1024, "file": _status_kib("RssFile") * 1024}
    manifest = read_manifest(cache_dir)
    teacher = CachedTeacher(CacheReader(cache_dir, manifest, verify=True), "cpu", manifest["fields"])
    n = manifest["layout"]["num_samples"]
    sampler = EpochSampler(n, batch, seed=0)
    peak = dict(base)
    began, rows = time.perf_counter(), 0
    for view in range(teacher.views):
        plan = sampler.batches(view)
        ahead = teacher.prefetch(view, plan[0])
        for step, index in enumerate(plan):
            current, ahead = ahead, teacher.prefetch(view, plan[step + 1]) if step + 1 < len(plan) else None
            idx = torch.from_numpy(index)
            fake = Batch(images=torch.empty(0), labels=idx, index=idx, aug=torch.empty(0), epoch=view)
            teacher.stage(_Staged(fake, view, index, current))
            out = teacher(fake, fake.images)
            rows += len(out.logits)
            now = {"rss": proc.memory_info().rss, "anon": _status_kib("RssAnon") * 1024, "file": _status_kib("RssFile") * 1024}
            peak = {k: max(peak[k], now[k]) for k in peak}
    seconds = time.perf_counter() - began
    teacher.close()
    print(json.dumps({"base": base, "peak": peak, "vm_hwm": _status_kib("VmHWM") * 1024, "rows": rows,
                      "rows_per_s": rows / seconds, "wait_ms_per_batch": 1000 * teacher.wait_seconds / (rows / batch)}))


def run_rss(work: Path) -> list[dict[str, Any]]:
    dims = {"logits": 100, "pooled": 2048}  # ResNet50-sized pooled features, fp32: 8.6 kB per sample
    out = []
    for views in (1, 6):
        cache = work / f"rss-{views}"
        shutil.rmtree(cache, ignore_errors=True)
        size = synthesize_cache(cache, 50_000, views, dims)
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        proc = subprocess.run([sys.executable, "-c", f"from rrd_fast.bench.cache import rss_child; rss_child({str(cache)!r})"],
                              capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"rss child failed: {proc.stderr.strip()[-500:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        out.append({"views": views, "cache_bytes": size, **result})
        _log(f"rss: cache {size / 2**30:.2f} GiB -> peak RSS {result['peak']['rss'] / 2**20:.0f} MiB")
        shutil.rmtree(cache, ignore_errors=True)
    return out


def run_gather() -> dict[str, float]:
    """µs per gather of 256 random rows (logits 100 + pooled 256, fp16) from a 50k-row shard."""
    import torch
    from safetensors import safe_open

    from rrd_fast.cache.shards import ShardFile, write_shard

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "view-0000.rows-00000000.safetensors"
        tensors = {"logits": torch.randn(50_000, 100).half(), "pooled": torch.randn(50_000, 256).half()}
        entry = write_shard(path, tensors, 0)
        shard = ShardFile(path, {**entry, "start": 0, "stop": 50_000}, {"logits": [100], "pooled": [256]}, "fp16", verify=True)
        rng = np.random.default_rng(0)
        with warnings.catch_warnings():  # read-only map: torch warns that the tensors are not writable
            warnings.simplefilter("ignore", UserWarning)
            as_torch = {k: torch.from_numpy(v) for k, v in shard.arrays.items()}

        def median_us(fn: Callable[[np.ndarray], Any], reps: int) -> float:
            times = []
            for _ in range(reps):
                index = rng.choice(50_000, 256, replace=False)
                began = time.perf_counter()
                fn(index)
                times.append(time.perf_counter() - began)
            return 1e6 * statistics.median(times)

        with safe_open(str(path), "pt") as fh:
            slices = {k: fh.get_slice(k) for k in tensors}
            result = {
                "np_take_mmap": median_us(lambda i: [np.take(a, i, axis=0) for a in shard.arrays.values()], 300),
                "torch_index_select_mmap": median_us(lambda i: [t.index_select(0, torch.from_numpy(i)) for t in as_torch.values()], 20),
                "safetensors_get_slice_per_row": median_us(
                    lambda i: [torch.cat([s[int(j) : int(j) + 1] for j in i]) for s in slices.values()], 10),
            }
        del as_torch
        shard.close()
    return result


def paper_scale(builds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """CIFAR-100, V=32 views × 50k samples: size on disk and one-H200 build time."""
    rows = []
    n, views, classes = 50_000, 32, NUM_CLASSES
    for teacher, (gflop, pooled) in PAPER_MODELS.items():
        per_sample = {d: (classes + pooled) * b for d, b in (("fp16", 2), ("fp32", 4))}
        flops = views * n * gflop * 1e9
        h200 = flops / (ASSUMED_MFU * H200_BF16_DENSE_TFLOPS * 1e12)
        cpu = sorted((b for b in builds if b["teacher"] == teacher), key=lambda b: -b["img_per_s"])  # faster precision
        rows.append({"teacher": teacher, "bytes_per_sample_fp16": per_sample["fp16"],
                     "size_gb_fp16": views * n * per_sample["fp16"] / 1e9, "size_gb_fp32": views * n * per_sample["fp32"] / 1e9,
                     "view_mb_fp16": n * per_sample["fp16"] / 1e6, "build_pflop": flops / 1e15, "h200_build_s": h200,
                     "online_240_epochs_pflop": 240 * n * gflop * 1e9 / 1e15,
                     "cpu_build_h_here": views * n / cpu[0]["img_per_s"] / 3600 if cpu else None})
    return rows


def format_report(result: dict[str, Any]) -> str:
    m = result.get("machine", {})
    lines = ["", f"machine: {m.get('cpus')} CPUs ({m.get('capability')}), load average {m.get('load_start')} at start, "
             f"{m.get('load_end')} at end: other jobs share the cores, so figures are noisy", ""]
    if result.get("throughput"):
        lines.append("throughput (img/s, medians)     student    online    cached   cached/student  cached/online  cache wait ms/step")
        for r in result["throughput"]:
            lines.append(f"{r['teacher']:>10}->{r['student']:<9} {r['precision']} b{r['batch']:<4}"
                         f"{r['student_img_s']:9.1f} {r['online_img_s']:9.1f} {r['cached_img_s']:9.1f}"
                         f"{r['cached_img_s'] / r['student_img_s']:14.2f}x {r['cached_img_s'] / r['online_img_s']:13.2f}x"
                         f"{r['cache_wait_ms_per_step']:14.2f}")
        lines.append("")
    if result.get("build"):
        lines.append(f"cache build on this CPU (teacher over {BENCH_VIEWS} views × {BENCH_SAMPLES} images):")
        for b in result["build"]:
            lines.append(f"  {b['teacher']:>10} {b['precision']}: {b['seconds']:6.1f} s = {b['img_per_s']:6.1f} img/s; "
                         f"{b['dtype']} {b['bytes_per_view'] / 2**20:.3f} MiB per view here, "
                         f"{b['bytes_per_view_50k'] / 2**20:.1f} MiB per view at 50k samples")
        lines.append("")
    if result.get("rss"):
        lines.append("peak memory reading every batch (256) of every view through the reader, fresh process:")
        for r in result["rss"]:
            lines.append(f"  cache {r['cache_bytes'] / 2**30:5.2f} GiB ({r['views']} views): peak RSS {r['peak']['rss'] / 2**20:6.0f} MiB "
                         f"(anon {r['peak']['anon'] / 2**20:.0f} MiB, file-backed/page cache {r['peak']['file'] / 2**20:.0f} MiB; "
                         f"at start {r['base']['rss'] / 2**20:.0f} MiB), {r['rows_per_s']:.0f} rows/s")
        lines.append("")
    if result.get("gather"):
        g = result["gather"]
        lines.append("gather 256 random rows from a 50k-row fp16 shard (µs, median): " +
                     ", ".join(f"{k} {v:.0f}" for k, v in g.items()))
        lines.append("")
    lines.append(f"paper scale, CIFAR-100, V=32 × 50k (H200 dense bf16 {H200_BF16_DENSE_TFLOPS:.0f} TFLOP/s at an assumed "
                 f"{ASSUMED_MFU:.0%} utilisation):")
    for p in result["paper_scale"]:
        cpu = f", ~{p['cpu_build_h_here']:.0f} h on these 2 CPU cores" if p["cpu_build_h_here"] else ""
        lines.append(f"  {p['teacher']:>10}: {p['bytes_per_sample_fp16']} B/sample fp16, {p['view_mb_fp16']:.1f} MB per view, "
                     f"{p['size_gb_fp16']:.2f} GB fp16 ({p['size_gb_fp32']:.2f} GB fp32); build {p['build_pflop']:.2f} PFLOP "
                     f"= {p['h200_build_s']:.0f} s on one H200{cpu}; online teacher over 240 epochs: "
                     f"{p['online_240_epochs_pflop']:.1f} PFLOP")
    return "\n".join(lines)


def _load_1min() -> float | None:
    load = load_average()
    return round(load[0], 1) if load else None


def run_bench(quick: bool = False, work: Path | None = None, only: list[str] | None = None) -> int:
    """Run the chosen parts (all by default) in `work` (default: a temporary folder) and print the report."""
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    parts = set(only or ["throughput", "build", "rss", "gather"])
    scratch = None
    if work is None:
        scratch = tempfile.TemporaryDirectory(prefix="rrd-cache-bench-")
        work = Path(scratch.name)
    work.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    result: dict[str, Any] = {"quick": quick, "machine": {"cpus": machine["cpu_count"], "load_start": _load_1min(),
                                                           "capability": machine["cpu_capability"]}}
    try:
        if parts & {"throughput", "build"}:
            _prepare(work)
            result["build"] = run_builds(work)  # the throughput runs read these caches
        if "throughput" in parts:
            result["throughput"] = run_throughput(work, rounds=1 if quick else 3)
        if "rss" in parts:
            result["rss"] = run_rss(work)
        if "gather" in parts:
            result["gather"] = run_gather()
        result["paper_scale"] = paper_scale(result.get("build", []))
        result["machine"]["load_end"] = _load_1min()
        write_json(work / "cache_bench.json", result)
        print(format_report(result))
    finally:
        if scratch is not None:
            scratch.cleanup()
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="fewest steps (smoke run)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--only", choices=["throughput", "build", "rss", "gather"], action="append",
                        help="run only these parts (repeatable)")


def command(args: argparse.Namespace) -> int:
    """`python -m rrd_fast.bench cache`."""
    return run_bench(quick=args.quick, work=args.work, only=args.only)
