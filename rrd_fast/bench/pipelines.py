"""Pipeline throughput, every contender measured side by side in one run.

    python -m rrd_fast.bench pipelines                      # CPU: 32×32 arrays and 64×64 JPEG folders
    python -m rrd_fast.bench pipelines --device cuda        # GPU: adds 224×224 random-resized crops from JPEG
    python -m rrd_fast.bench pipelines --write-auto-table   # also record this machine's faster backend for data.pipeline=auto
    python -m rrd_fast.bench pipelines --sections arrays --dali-lanes 1,2,4   # DALI with other lane counts too
    python -m rrd_fast.bench pipelines --half bf16,fp16     # also the half-precision batches mixed-precision runs get
    python -m rrd_fast.bench pipelines --dali-sequence      # also DALI with one sequence sample per batch

Sections:
- arrays: 50k uint8 32×32×3 images, batch 256, pad-4 crop + flip + normalise: the torch
  `ArrayPipeline`, the DALI pipeline (its default lanes, plus any `--dali-lanes`), and a
  per-sample Python `DataLoader` baseline with `--workers` worker processes doing the same
  work image by image;
- jpeg: a generated Tiny-ImageNet-like folder (>= 5k 64×64 JPEGs), random-resized crop to 64 +
  flip + normalise: DALI, the torch/Pillow thread-pool pipeline, and a per-sample Pillow
  `DataLoader` with the same number of workers;
- jpeg224 (cuda only): ImageNet-like folders of larger JPEGs, random-resized crop to 224.

Each repeat runs the contenders one after another (interleaved), `--batches` batches each
after `--warmup` untimed batches (at least one per DALI lane, each of which builds its
pipeline on its first batch); the figure reported is the median over repeats. The process
re-executes itself once with the glibc malloc tunables training uses
(rrd_fast/malloc_tuning.py; RRD_FAST_NO_MALLOC_TUNING=1 measures without them). Timings
on a shared machine are noisy: say so when quoting them. `--targets` also prints whether
the development targets are met.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from pipelines.augment import CropFlipSpec, ResizedCropSpec
from pipelines.auto import machine_description, machine_key, merge_entries
from pipelines.backends import AUTO_TABLE, auto_key, build_pipeline, load_auto_table
from pipelines.errors import DataError
from pipelines.formats import ArraySplit, FileSplit, get_format, read_split
from pipelines.sampler import EpochSampler
from pipelines.views import train_box
from rrd_fast.bench.common import CIFAR100, NUM_CLASSES, machine_name, per_sample_loader, write_json
from rrd_fast.malloc_tuning import TUNABLES_VAR

HELP = "pipeline throughput: torch, DALI and a per-sample DataLoader; writes the auto-backend table"
TARGETS = {  # (section, contender, device type) -> img/s the issue asks for
    ("arrays", "dali", "cpu"): 80_000,
    ("arrays", "dali", "cuda"): 1_000_000,
    ("jpeg224", "dali", "cuda"): 20_000,
}


# ---------------------------------------------------------------------------------------
# per-sample baselines (what a typical torch DataLoader recipe does)
# ---------------------------------------------------------------------------------------

class ArraySamples(torch.utils.data.Dataset):
    """One image at a time: pad, crop, flip, normalise in numpy (same parameters as the pipelines)."""

    def __init__(self, images: np.ndarray, spec: CropFlipSpec, seed: int, epoch: int, mean, std) -> None:
        self.images, self.spec, self.seed, self.epoch = images, spec, seed, epoch
        self.mean = np.asarray(mean, np.float32) * 255
        self.std = np.asarray(std, np.float32) * 255

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        dy, dx, flip = self.spec.params(self.seed, self.epoch, np.array([i]))[0]
        p = self.spec.pad
        img = np.pad(self.images[i], ((p, p), (p, p), (0, 0)))
        h, w = self.images.shape[1:3]
        img = img[dy:dy + h, dx:dx + w]
        if flip:
            img = img[:, ::-1]
        out = (img.astype(np.float32) - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))


class JpegSamples(torch.utils.data.Dataset):
    """One file at a time with Pillow: decode, random-resized crop (same boxes), flip, normalise."""

    def __init__(self, paths: list[Path], spec: ResizedCropSpec, size: int, seed: int, epoch: int, mean, std) -> None:
        self.paths, self.spec, self.size, self.seed, self.epoch = paths, spec, size, seed, epoch
        self.mean = np.asarray(mean, np.float32) * 255
        self.std = np.asarray(std, np.float32) * 255

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        row = self.spec.params(self.seed, self.epoch, np.array([i]))[0]
        with Image.open(self.paths[i]) as im:
            im = im.convert("RGB")
            out = im.resize((self.size, self.size), Image.BILINEAR, box=train_box(row, *im.size))
        if row[4] >= 0.5:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        arr = (np.asarray(out, dtype=np.float32) - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def _loader(dataset: torch.utils.data.Dataset, order: np.ndarray, batch: int, workers: int, device: torch.device) -> Iterator:
    loader = per_sample_loader(dataset, batch, workers, order=order, pin_memory=device.type == "cuda")
    for images in loader:
        yield images.to(device, non_blocking=True)


# ---------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------

@dataclass
class Contender:
    section: str
    name: str
    label: str
    batches: Callable[[int], Iterator]  # epoch -> iterator of batches (images tensor or Batch)
    backend: str | None = None  # a data.pipeline backend, eligible for the auto table
    warmup: int = 0  # untimed batches at least (a DALI lane builds its pipeline on its first batch)
    in_process: bool = True  # all its work is in this process's threads, so its CPU time is measurable


@dataclass
class Timing:
    img_s: float
    cpu_us_per_img: float  # this process's CPU time (all threads) per image: steadier than img/s on a shared VM


def _count(item) -> int:
    return int(item.shape[0]) if isinstance(item, torch.Tensor) else len(item)


def time_batches(make: Callable[[int], Iterator], epoch: int, batches: int, warmup: int, device: torch.device) -> Timing:
    """Throughput and CPU cost over up to `batches` batches of one epoch, after `warmup` untimed batches."""
    seen, done, start, cpu_start = 0, 0, None, 0.0
    for k, item in enumerate(make(epoch)):
        if k < warmup:  # pipelines built, workers started, decoders initialised
            continue
        if start is None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
        seen += _count(item)
        done += 1
        if done >= batches:
            break
    if start is None or not seen:
        return Timing(0.0, 0.0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return Timing(seen / wall, cpu / seen * 1e6)


# ---------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------

def _count_of(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' if n != 1 else ''}"


def array_contenders(args: argparse.Namespace, device: torch.device) -> list[Contender]:
    rng = np.random.default_rng(0)
    n = args.array_images
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, NUM_CLASSES, n)
    fmt = CIFAR100
    split = ArraySplit(images, labels, [str(i) for i in range(NUM_CLASSES)])
    spec = CropFlipSpec(pad=4)
    batch = args.array_batch or args.batch
    sampler = EpochSampler(n, batch, seed=0)
    torch_pipe = build_pipeline("torch", split, fmt, sampler, spec, device=device)
    out = [Contender("arrays", "torch", "torch ArrayPipeline", torch_pipe.epoch, "torch")]
    from pipelines.dali_arrays import DaliArrayPipeline

    def dali(**options: Any) -> DaliArrayPipeline:  # lanes, sequence, dtype
        return DaliArrayPipeline(images, labels, sampler, fmt.mean, fmt.std, spec, device=device, **options)

    default = dali()
    variants = [(default, "dali")] + [(dali(lanes=n), f"dali_{n}") for n in args.dali_lanes if n != default.lanes]
    for pipe, name in variants:
        label = f"DALI ({_count_of(pipe.lanes, 'lane')} x {_count_of(pipe.threads_per_lane, 'thread')})"
        out.append(Contender("arrays", name, label + (", default" if name == "dali" else ""), pipe.epoch, "dali",
                             warmup=pipe.lanes))
    if args.dali_sequence:  # one DALI sample per batch (reading only: training uses the default layout)
        seq = dali(sequence=True)
        out.append(Contender("arrays", "dali_seq", f"DALI sequences ({_count_of(seq.lanes, 'lane')}, warp_affine)",
                             seq.epoch, warmup=seq.lanes))
    for name, dtype in args.half:  # what mixed-precision runs get: half-precision batches
        half_torch = build_pipeline("torch", split, fmt, sampler, spec, device=device, dtype=dtype)
        half_dali = dali(dtype=dtype)
        out += [Contender("arrays", f"torch_{name}", f"torch ArrayPipeline, {name} batches", half_torch.epoch),
                Contender("arrays", f"dali_{name}", f"DALI ({_count_of(half_dali.lanes, 'lane')}), {name} batches",
                          half_dali.epoch, warmup=half_dali.lanes)]
    out.append(Contender(
        "arrays", "dataloader", f"per-sample DataLoader ({args.workers} workers)",
        lambda e: _loader(ArraySamples(images, spec, 0, e, fmt.mean, fmt.std), sampler.order(e), batch,
                          args.workers, device), in_process=args.workers == 0))
    return out


def file_contenders(section: str, split: FileSplit, fmt_name: str, size: int, args: argparse.Namespace,
                    device: torch.device) -> list[Contender]:
    fmt = get_format(fmt_name)
    spec = ResizedCropSpec()
    sampler = EpochSampler(len(split.labels), args.batch, seed=0)
    from pipelines.dali_files import DaliFilePipeline
    from pipelines.torch_files import FilePipeline
    from pipelines.views import eval_view

    def dali(dtype: torch.dtype = torch.float32) -> DaliFilePipeline:
        return DaliFilePipeline(split.paths, split.labels, sampler, fmt.mean, fmt.std, spec, size, eval_view(fmt),
                                device=device, dtype=dtype, num_threads=args.workers)

    def pil(dtype: torch.dtype = torch.float32) -> FilePipeline:
        return FilePipeline(split.paths, split.labels, sampler, fmt.mean, fmt.std, spec, size, eval_view(fmt),
                            device=device, dtype=dtype, workers=args.workers)

    half = []
    for name, dtype in args.half:
        half += [Contender(section, f"dali_{name}", f"DALI, {name} batches", dali(dtype).epoch),
                 Contender(section, f"torch_{name}", f"torch/Pillow thread pool, {name} batches", pil(dtype).epoch)]
    return [
        Contender(section, "dali", "DALI", dali().epoch, "dali"),
        Contender(section, "torch", f"torch/Pillow thread pool ({args.workers} threads)", pil().epoch, "torch"),
        *half,
        Contender(section, "dataloader", f"per-sample Pillow DataLoader ({args.workers} workers)",
                  lambda e: _loader(JpegSamples(split.paths, spec, size, 0, e, fmt.mean, fmt.std), sampler.order(e),
                                    args.batch, args.workers, device), in_process=args.workers == 0),
    ]


def tiny_split(root: Path, images: int) -> FileSplit:
    from pipelines.synthetic import write_tiny_imagenet

    classes = 50
    write_tiny_imagenet(root, classes, -(-images // classes), 1, seed=0, size=64)
    return read_split("tiny_imagenet", root, "train")


def imagenet_split(root: Path, images: int, side: int) -> FileSplit:
    from pipelines.synthetic import write_imagenet_folders

    classes = 16
    write_imagenet_folders(root, classes, -(-images // classes), side, seed=0, per_class_val=1)
    return read_split("imagenet", root, "train")


# ---------------------------------------------------------------------------------------
# reporting and the auto table
# ---------------------------------------------------------------------------------------

def write_auto_table(path: Path, results: dict[str, dict[str, float]], sections: dict[str, str], device: torch.device,
                     contenders: list[Contender], note: str = "") -> dict[str, dict]:
    """Merge this machine's choice per dataset kind into its row of the table (other machines and rows kept)."""
    table = load_auto_table(path)
    backend_of = {(c.section, c.name): c.backend for c in contenders if c.backend}
    written = {}
    for section, kind in sections.items():
        figures: dict[str, float] = {}  # backend -> its best contender (DALI may run with several lane counts)
        for name, value in results.get(section, {}).items():
            backend = backend_of.get((section, name))
            if backend:
                figures[backend] = max(value, figures.get(backend, 0.0))
        if len(figures) < 2:
            continue
        written[auto_key(kind, device)] = {
            "backend": max(figures, key=figures.get),
            "img_s": {k: round(v) for k, v in figures.items()},
            "section": section,
            "source": "bench",
            "measured": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
            **({"note": note} if note else {}),
        }
    write_json(path, merge_entries(table, machine_description(device), written))
    return written


def report(results: dict[str, dict[str, list[Timing]]], contenders: list[Contender], device: torch.device,
           show_targets: bool = False) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Print median img/s (and CPU us/img of in-process contenders); return both medians per section."""
    labels = {(c.section, c.name): c.label for c in contenders}
    in_process = {(c.section, c.name) for c in contenders if c.in_process}
    medians: dict[str, dict[str, float]] = {}
    cpu_medians: dict[str, dict[str, float]] = {}
    print(f"\n{'section':<10} {'contender':<44} {'median img/s':>14} {'CPU us/img':>11}  runs (img/s)")
    for section, per in results.items():
        medians[section], cpu_medians[section] = {}, {}
        for name, runs in per.items():
            med = statistics.median(r.img_s for r in runs)
            medians[section][name] = med
            cpu = "-"
            if (section, name) in in_process:
                cpu_medians[section][name] = statistics.median(r.cpu_us_per_img for r in runs)
                cpu = f"{cpu_medians[section][name]:.1f}"
            shown = ", ".join(f"{r.img_s:,.0f}" for r in runs)
            print(f"{section:<10} {labels[(section, name)]:<44} {med:>14,.0f} {cpu:>11}  {shown}")
        base = medians[section].get("dataloader")
        dali = medians[section].get("dali")
        for name, med in medians[section].items():
            if name != "dataloader" and base:
                print(f"{'':<10} ratio {name} / per-sample DataLoader: {med / base:.2f}x")
        if dali and medians[section].get("torch"):
            print(f"{'':<10} ratio dali / torch: {dali / medians[section]['torch']:.2f}x")
    for (section, name, dev), target in TARGETS.items() if show_targets else ():
        if dev == device.type and section in medians and name in medians[section]:
            got = medians[section][name]
            verdict = "met" if got >= target else "MISSED"
            print(f"target {section}/{name} on {dev}: {got:,.0f} img/s vs {target:,.0f}: {verdict}")
    return medians, cpu_medians


HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _half_dtypes(value: str) -> list[tuple[str, torch.dtype]]:
    names = [v for v in value.split(",") if v]
    unknown = [n for n in names if n not in HALF_DTYPES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown half precision {unknown[0]!r} (bf16, fp16)")
    return [(n, HALF_DTYPES[n]) for n in names]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--sections", default="", help="comma-separated subset of arrays,jpeg,jpeg224 (default: all for the device)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--array-batch", type=int, default=0, help="batch size of the arrays section (default: --batch)")
    parser.add_argument("--batches", type=int, default=100,
                        help="timed batches per contender per repeat (at most one epoch minus the warm-up)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches before each measurement")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers, DALI and Pillow threads")
    parser.add_argument("--dali-lanes", type=lambda v: [int(x) for x in v.split(",") if x], default=[],
                        help="arrays: also time DALI with these lane counts, e.g. 1,2,4 (default: only its default)")
    parser.add_argument("--dali-sequence", action="store_true",
                        help="arrays: also time DALI with one sequence sample per batch (per-frame warp_affine)")
    parser.add_argument("--half", type=_half_dtypes, default=[],
                        help="also time the torch and DALI pipelines with half-precision batches (bf16, fp16 or "
                             "bf16,fp16), as mixed-precision runs get them")
    parser.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--array-images", type=int, default=50_000)
    parser.add_argument("--jpeg-images", type=int, default=5_000)
    parser.add_argument("--jpeg224-images", type=int, default=4_096)
    parser.add_argument("--jpeg224-side", type=int, default=400, help="side of the generated ImageNet-like JPEGs")
    parser.add_argument("--data-dir", type=Path, help="keep generated JPEG folders here (default: a temporary folder)")
    parser.add_argument("--write-auto-table", nargs="?", const=AUTO_TABLE, type=Path, metavar="PATH",
                        help=f"record the faster backend per dataset kind and device type in this machine's row "
                             f"(default {AUTO_TABLE.name})")
    parser.add_argument("--note", default="", help="remark stored with the auto-table entries (e.g. machine load)")
    parser.add_argument("--json", type=Path, help="also write the medians as JSON here")
    parser.add_argument("--targets", action="store_true", help="also print whether the development targets are met")


def command(args: argparse.Namespace) -> int:
    """`python -m rrd_fast.bench pipelines`: time every contender, print the medians, optionally record them."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda: no CUDA device is available")
    default = ["arrays", "jpeg"] + (["jpeg224"] if device.type == "cuda" else [])
    sections = [s for s in args.sections.split(",") if s] or default
    unknown = set(sections) - {"arrays", "jpeg", "jpeg224"}
    if unknown:
        raise DataError(f"--sections: unknown section {sorted(unknown)[0]!r} (arrays, jpeg, jpeg224)")
    for flag, n, batch in (("--array-images", args.array_images, args.array_batch or args.batch),
                           ("--jpeg-images", args.jpeg_images, args.batch),
                           ("--jpeg224-images", args.jpeg224_images, args.batch)):
        if n < batch * (args.warmup + 1):
            raise DataError(f"{flag}: {n} images do not fill the warm-up plus one timed batch of {batch}")

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    print(f"rrd_fast.bench pipelines on {machine_name(device)}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"batch {args.batch} (arrays {args.array_batch or args.batch}), {args.repeats} repeats x up to "
          f"{args.batches} batches after {args.warmup} warm-up, {args.workers} workers/threads, "
          f"malloc tunables {'on' if os.environ.get(TUNABLES_VAR) else 'off'}")
    with tempfile.TemporaryDirectory(prefix="rrd-bench-") as tmp:
        data_dir = args.data_dir or Path(tmp)
        contenders: list[Contender] = []
        if "arrays" in sections:
            contenders += array_contenders(args, device)
        if "jpeg" in sections:
            t0 = time.perf_counter()
            split = tiny_split(data_dir / "tiny", args.jpeg_images)
            print(f"jpeg: {len(split.paths)} 64x64 JPEGs ready in {time.perf_counter() - t0:.1f} s")
            contenders += file_contenders("jpeg", split, "tiny_imagenet", 64, args, device)
        if "jpeg224" in sections:
            t0 = time.perf_counter()
            split = imagenet_split(data_dir / "imagenet", args.jpeg224_images, args.jpeg224_side)
            print(f"jpeg224: {len(split.paths)} {args.jpeg224_side}x{args.jpeg224_side} JPEGs ready in "
                  f"{time.perf_counter() - t0:.1f} s")
            contenders += file_contenders("jpeg224", split, "imagenet", 224, args, device)
        results: dict[str, dict[str, list[Timing]]] = {}
        for rep in range(args.repeats):
            for c in contenders:
                timing = time_batches(c.batches, rep, args.batches, max(args.warmup, c.warmup), device)
                results.setdefault(c.section, {}).setdefault(c.name, []).append(timing)
                print(f"  repeat {rep + 1}: {c.section:<8} {c.label:<44} {timing.img_s:>12,.0f} img/s", flush=True)
        medians, cpu_medians = report(results, contenders, device, show_targets=args.targets)
    if args.json:
        write_json(args.json, {"device": machine_name(device), "medians": medians, "cpu_us_per_img": cpu_medians})
    if args.write_auto_table:
        kinds = {"arrays": "array", "jpeg": "files", "jpeg224": "files"}
        chosen = {s: kinds[s] for s in sections if not (s == "jpeg" and "jpeg224" in sections)}
        written = write_auto_table(args.write_auto_table, medians, chosen, device, contenders, args.note)
        machine = machine_key(machine_description(device))
        for key, entry in written.items():
            print(f"auto table {args.write_auto_table}: [{machine}] {key} -> {entry['backend']} ({entry['img_s']})")
    return 0

