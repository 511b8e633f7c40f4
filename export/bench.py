"""`python -m export.bench RUN_DIR [RUN_DIR ...] --backends ... --out DIR`: latency against accuracy.

For each student × backend × precision it exports an artifact (or reuses a matching one
under OUT/artifacts), loads it back, and for each batch size B records the latency of one
call on a batch of B (p50/p90/p99, warm-up excluded; CUDA events on GPU) and the
throughput of those same calls, B / p50 latency; points whose p90 exceeds p50 by more
than `export.timing.NOISY_RATIO` are flagged noisy. It runs the artifact itself over
the whole evaluation split for its top-1, and compares its logits with the torch
checkpoint's (max abs difference, share of identical top-1). Results go to OUT/bench.json,
and OUT/bench.md and OUT/bench.png are rendered from that file.

Reused AOTInductor and TensorRT artifacts run native code when loaded, so they are refused
when other users can write their folder, unless `--trust-artifact` (see `export.artifact`).
"""

from __future__ import annotations

import datetime as _dt
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from export.artifact import ARTIFACT_SIDECAR, Artifact, check_out_folder, load_artifact, read_artifact_sidecar
from export.base import PRECISIONS, get_backend, parse_batch_sizes
from export.cli import OneLineParser, run_cli
from export.data import DataSource, ImageSet, calibration_source, data_source
from export.errors import ExportError
from export.exporter import DEFAULT_BATCH_SIZES, DEFAULT_CALIB_SAMPLES, device_name, export_model, resolve_device, runtime_versions
from export.report import write_reports
from export.timing import NOISY_RATIO, measure
from rrd_fast.atomic import write_json_atomic
from rrd_fast.checkpoint import read_model_checkpoint

BENCH_FORMAT = "rrd-fast-bench/1"


@dataclass
class Settings:
    backends: list[str]
    precisions: list[str]
    batch_sizes: tuple[int, ...]
    device: str
    out: Path
    data: str | None = None
    eval_limit: int | None = None
    eval_batch_size: int = 256
    warmup: int = 10
    iters: int = 100
    budget_s: float | None = 5.0
    threads: int = 0
    reexport: bool = False
    skip_unsupported: bool = False
    static: bool = False
    calib_samples: int = DEFAULT_CALIB_SAMPLES
    trust_artifact: bool = False


@dataclass
class Student:
    run_dir: Path
    key: str
    model: torch.nn.Module
    meta: dict[str, Any]
    source: DataSource

    @property
    def method(self) -> str:
        """What the student was trained with, KD included when it was weighted in: `kd`, `rrd`, `rrd+kd`."""
        return method_label(self.meta.get("method"))


def method_label(method: Any) -> str:
    """A checkpoint's `method` record as a label; alpha > 0 adds the KD term to any other method."""
    if not isinstance(method, dict) or not method.get("name"):
        return "unknown"
    name = str(method["name"])
    try:
        alpha = float(method.get("alpha") or 0.0)
    except (TypeError, ValueError):
        alpha = 0.0
    return f"{name}+kd" if name != "kd" and alpha > 0 else name


def _students(run_dirs: Sequence[str], settings: Settings) -> list[Student]:
    students = []
    for run_dir in run_dirs:
        model, meta = read_model_checkpoint(run_dir)
        source = data_source(meta, settings.data, settings.eval_limit)
        students.append(Student(Path(run_dir), Path(run_dir).resolve().name, model, meta, source))
    # Each student is named by its run folder; two folders of one name get their parent's name too.
    names = [s.key for s in students]
    for s in students:
        if names.count(s.key) > 1:
            s.key = f"{s.run_dir.resolve().parent.name}/{s.run_dir.resolve().name}"
    keys = [s.key for s in students]
    for i, s in enumerate(students):
        if keys.count(s.key) > 1:  # the same folder given twice
            s.key = f"{s.key}#{i}"
    return students


def point_label(run: str, method: str, backend: str, precision: str) -> str:
    """What a point is called in the table, the plot and the log: run name, method, backend (and precision)."""
    return f"{run} ({method}) {backend}" + ("" if precision == "fp32" else f" {precision}")


def _reusable(folder: Path, student: Student, backend: str, precision: str, device: str,
              sizes: Sequence[int], static: bool) -> bool:
    """An artifact already there for this exact checkpoint, backend, precision, device and torch version."""
    if not (folder / ARTIFACT_SIDECAR).is_file():
        return False
    try:
        meta = read_artifact_sidecar(folder)
    except ExportError:
        return False
    same = (meta["source"].get("sha256") == student.meta.get("sha256") and meta["backend"] == backend
            and meta["precision"] == precision and meta["device"] == device
            and meta.get("versions", {}).get("torch") == torch.__version__)
    if not same:
        return False
    if meta["dynamic_batch"]:
        return not static
    return set(sizes) <= set(meta["batch_sizes"])


def _artifact(student: Student, backend: str, precision: str, settings: Settings) -> tuple[Artifact, float | None]:
    checkpoint = f"{student.meta['arch']}-{str(student.meta.get('sha256'))[:12]}"
    folder = settings.out / "artifacts" / checkpoint / f"{backend}-{precision}-{settings.device}"
    spent: float | None = None
    if settings.reexport or not _reusable(folder, student, backend, precision, settings.device,
                                          settings.batch_sizes, settings.static):
        calibration, info = None, None
        if precision == "int8":
            calibration, info = calibration_source(student.source, student.meta, settings.calib_samples)
        t0 = time.perf_counter()
        export_model(student.model, student.meta, student.run_dir, backend, folder, precision, settings.device,
                     settings.batch_sizes, False if settings.static else None, calibration, info)
        spent = time.perf_counter() - t0
        print(f"  exported {backend} {precision} in {spent:.1f} s -> {folder}", flush=True)
    return load_artifact(folder, settings.device, expect_source_sha=student.meta.get("sha256"),
                         trust=settings.trust_artifact), spent


def _reference(student: Student, images: ImageSet, settings: Settings) -> torch.Tensor:
    """The torch checkpoint's own fp32 logits on every evaluation image (CPU tensor)."""
    model = student.model.to(settings.device).eval()
    outs = []
    with torch.inference_mode():
        for batch in images.batches(settings.eval_batch_size):
            outs.append(model(batch).float().cpu())
    student.model.to("cpu")
    return torch.cat(outs)


def _evaluate(artifact: Artifact, images: ImageSet, size: int) -> torch.Tensor:
    """The artifact's logits on every evaluation image, fed in batches of `size` (CPU tensor)."""
    outs = [artifact.predict(batch).cpu() for batch in images.batches(size)]
    return torch.cat(outs)


def _agreement(logits: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    pred, ref_pred = logits.argmax(1), reference.argmax(1)
    return {
        "top1": 100.0 * float((pred == labels).double().mean()),
        "max_abs_logit_diff": float((logits - reference).abs().max()),
        "top1_agreement": 100.0 * float((pred == ref_pred).double().mean()),
    }


def _check_requests(students: list[Student], settings: Settings) -> tuple[list[tuple[str, str]], list[dict[str, Any]]]:
    """All backend/precision pairs this machine can run; the rest are refused (or skipped when asked)."""
    runnable, skipped = [], []
    for backend in settings.backends:
        for precision in settings.precisions:
            try:
                get_backend(backend).check(precision, settings.device)
                runnable.append((get_backend(backend).name, precision))
            except ExportError as exc:
                if not settings.skip_unsupported:
                    raise
                skipped += [{"student": s.key, "backend": backend, "precision": precision, "reason": str(exc)}
                            for s in students]
    return runnable, skipped


def run_bench(run_dirs: Sequence[str], settings: Settings) -> Path:
    """Run the whole benchmark; returns the JSON path (markdown and PNG are written beside it)."""
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    settings.threads = torch.get_num_threads()
    for backend in settings.backends:
        get_backend(backend)
    students = _students(run_dirs, settings)
    runnable, skipped = _check_requests(students, settings)
    results: list[dict[str, Any]] = []
    student_info = []
    for student in students:
        images = ImageSet(student.source, student.meta, limit=student.source.eval_limit, device=settings.device)
        reference = _reference(student, images, settings)
        labels = images.labels
        torch_top1 = 100.0 * float((reference.argmax(1) == labels).double().mean())
        student_info.append({
            "student": student.key, "run_dir": str(student.run_dir.resolve()), "arch": student.meta["arch"],
            "method": student.method, "sha256": student.meta.get("sha256"), "torch_top1": torch_top1,
            "top1_final_in_training": student.meta.get("top1_final"),
            "data": {"format": student.source.format, "root": student.source.root, "split": images.split_name,
                     "n_eval": len(images)},
        })
        print(f"{student.key} ({student.method}): torch fp32 top-1 {torch_top1:.2f} on {len(images)} images", flush=True)
        for backend, precision in runnable:
            artifact, export_s = _artifact(student, backend, precision, settings)
            static = artifact.static_batch_sizes
            eval_sizes = [s for s in static if s in settings.batch_sizes] if static else [settings.eval_batch_size]
            metrics = {size: _agreement(_evaluate(artifact, images, size), reference, labels) for size in eval_sizes}
            for size in settings.batch_sizes:
                eval_size = size if static else settings.eval_batch_size
                x = images.first_batch(size)
                latency = measure(artifact, x, warmup=settings.warmup, iters=settings.iters, budget_s=settings.budget_s)
                m = metrics[eval_size]
                label = point_label(student.key, student.method, backend, precision)
                results.append({
                    "student": student.key, "label": label, "arch": student.meta["arch"], "method": student.method,
                    "backend": backend, "precision": precision, "device": settings.device, "batch_size": size,
                    "latency": latency.to_dict(), **m, "torch_top1": torch_top1, "top1_delta": m["top1"] - torch_top1,
                    "n_eval": len(images), "eval_batch_size": eval_size, "artifact": str(artifact.folder),
                    "export_s": export_s,
                })
                noisy = f" NOISY (p90/p50 above {NOISY_RATIO:g})" if latency.noisy else ""
                print(f"  {label} b{size}: p50 {latency.p50_ms:.3f} ms, p90 {latency.p90_ms:.3f} ms "
                      f"(p90/p50 {latency.p90_over_p50:.2f}{noisy}), {latency.throughput_ips:.0f} img/s at p50, "
                      f"top-1 {m['top1']:.2f}, max|Δ| {m['max_abs_logit_diff']:.1e}", flush=True)
    _add_eager_ratios(results)
    report = {
        "format": BENCH_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": {"type": settings.device, "name": device_name(settings.device),
                   "timer": "cuda_event" if settings.device == "cuda" else "perf_counter"},
        "versions": {**runtime_versions(), **_backend_versions(runnable)},
        "settings": {"backends": settings.backends, "precisions": settings.precisions,
                     "batch_sizes": list(settings.batch_sizes), "warmup": settings.warmup, "iters": settings.iters,
                     "budget_s": settings.budget_s, "threads": settings.threads,
                     "eval_batch_size": settings.eval_batch_size, "eval_limit": settings.eval_limit,
                     "static": settings.static},
        "students": student_info,
        "results": results,
        "skipped": skipped,
    }
    json_path = settings.out / "bench.json"
    write_json_atomic(json_path, report)
    write_reports(json_path)
    return json_path


def _add_eager_ratios(results: list[dict[str, Any]]) -> None:
    """p50 relative to eager on the same student and batch: same precision if eager ran it, else eager fp32."""
    eager = {(r["student"], r["batch_size"], r["precision"]): r["latency"]["p50_ms"]
             for r in results if r["backend"] == "eager"}
    for row in results:
        key = (row["student"], row["batch_size"])
        base = eager.get((*key, row["precision"]), eager.get((*key, "fp32")))
        row["p50_vs_eager"] = row["latency"]["p50_ms"] / base if base else None


def _backend_versions(runnable: list[tuple[str, str]]) -> dict[str, str]:
    versions: dict[str, str] = {}
    for backend, _ in runnable:
        versions.update(get_backend(backend).versions())
    return versions


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="python -m export.bench", description="Benchmark exported students: latency against accuracy.")
    p.add_argument("run_dirs", nargs="+", help="student run or checkpoint folders")
    p.add_argument("--backends", default="eager,onnxruntime,aotinductor", help="comma-separated backends")
    p.add_argument("--precisions", default="fp32", help=f"comma-separated, from {', '.join(PRECISIONS)}")
    p.add_argument("--batch-sizes", default=",".join(map(str, DEFAULT_BATCH_SIZES)))
    p.add_argument("--data", default=None, help="training config (YAML) whose data section (format, root, "
                                               "eval_limit) is used instead of each checkpoint's own dataset")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N images only (0: all)")
    p.add_argument("--eval-batch-size", type=int, default=256, help="batch size for accuracy passes of dynamic artifacts")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--warmup", type=int, default=10, help="untimed calls before timing each point")
    p.add_argument("--iters", type=int, default=100, help="most timed calls per point")
    p.add_argument("--budget", type=float, default=5.0, help="stop timing a point after this many timed seconds "
                                                            "(at least 5 calls); 0 disables")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch and onnxruntime (0: torch's default)")
    p.add_argument("--static", action="store_true", help="one artifact per batch size for every backend")
    p.add_argument("--reexport", action="store_true", help="export again even when a matching artifact exists")
    p.add_argument("--skip-unsupported", action="store_true",
                   help="record backend/precision pairs this machine cannot run instead of stopping")
    p.add_argument("--calib-samples", type=int, default=DEFAULT_CALIB_SAMPLES)
    p.add_argument("--out", default="bench_out", help="output folder (artifacts/, bench.json, bench.md, bench.png)")
    p.add_argument("--trust-artifact", action="store_true",
                   help="load AOTInductor/TensorRT artifacts (native code) even when other users can write their "
                        "folder; only for folders whose writers you trust")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    for p in precisions:
        if p not in PRECISIONS:
            raise ExportError(f"--precisions: unknown precision {p!r} (known: {', '.join(PRECISIONS)})")
    for name, value, low in (("--warmup", args.warmup, 0), ("--iters", args.iters, 1),
                             ("--eval-batch-size", args.eval_batch_size, 1), ("--calib-samples", args.calib_samples, 1)):
        if value < low:
            raise ExportError(f"{name} must be >= {low}, got {value}")
    check_out_folder(args.out)
    settings = Settings(
        backends=[b.strip() for b in args.backends.split(",") if b.strip()], precisions=precisions,
        batch_sizes=parse_batch_sizes(args.batch_sizes), device=resolve_device(args.device), out=Path(args.out),
        data=args.data, eval_limit=args.eval_limit, eval_batch_size=args.eval_batch_size, warmup=args.warmup,
        iters=args.iters, budget_s=args.budget if args.budget > 0 else None, threads=args.threads,
        reexport=args.reexport, skip_unsupported=args.skip_unsupported, static=args.static,
        calib_samples=args.calib_samples, trust_artifact=args.trust_artifact,
    )
    if not settings.backends:
        raise ExportError("--backends: at least one backend is required")
    json_path = run_bench(args.run_dirs, settings)
    print(f"wrote {json_path}, {json_path.with_suffix('.md')}, {json_path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(lambda: main()))
