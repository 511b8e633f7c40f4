"""Pipeline throughput, every contender measured side by side in one run.

    python -m pipelines.bench                       # CPU: 32×32 arrays and 64×64 JPEG folders
    python -m pipelines.bench --device cuda         # GPU: adds 224×224 random-resized crops from JPEG
    python -m pipelines.bench --write-auto-table    # also record the faster backend for data.pipeline=auto

Sections:
- arrays: 50k uint8 32×32×3 images, batch 256, pad-4 crop + flip + normalise: the torch
  `ArrayPipeline`, the DALI pipeline, and a per-sample Python `DataLoader` baseline with
  `--workers` worker processes doing the same work image by image;
- jpeg: a generated Tiny-ImageNet-like folder (>= 5k 64×64 JPEGs), random-resized crop to 64 +
  flip + normalise: DALI, the torch/Pillow thread-pool pipeline, and a per-sample Pillow
  `DataLoader` with the same number of workers;
- jpeg224 (cuda only): ImageNet-like folders of larger JPEGs, random-resized crop to 224.

Each repeat runs the contenders one after another (interleaved), `--batches` batches each
after one warm-up batch; the figure reported is the median over repeats. Timings on a
shared machine are noisy: say so when quoting them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from pipelines.augment import CropFlipSpec, ResizedCropSpec
from pipelines.backends import AUTO_TABLE, auto_key, build_pipeline, load_auto_table
from pipelines.errors import DataError
from pipelines.formats import FileSplit, get_format, read_split
from pipelines.formats.base import ArraySplit
from pipelines.sampler import EpochSampler
from pipelines.views import train_box

CIFAR_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR_STD = (0.2675, 0.2565, 0.2761)

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
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=order.tolist(), num_workers=workers,
                                         drop_last=True, pin_memory=device.type == "cuda", persistent_workers=False)
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


def _count(item) -> int:
    return int(item.shape[0]) if isinstance(item, torch.Tensor) else len(item)


def time_batches(make: Callable[[int], Iterator], epoch: int, batches: int, warmup: int, device: torch.device) -> float:
    """img/s over up to `batches` batches of one epoch, after `warmup` untimed batches."""
    seen, done, start = 0, 0, None
    for k, item in enumerate(make(epoch)):
        if k < warmup:  # pipelines built, workers started, decoders initialised
            continue
        if start is None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        seen += _count(item)
        done += 1
        if done >= batches:
            break
    if start is None or not seen:
        return 0.0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return seen / (time.perf_counter() - start)


# ---------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------

def array_contenders(args: argparse.Namespace, device: torch.device) -> list[Contender]:
    rng = np.random.default_rng(0)
    n = args.array_images
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 100, n)
    fmt = get_format("cifar100")
    split = ArraySplit(images, labels, [str(i) for i in range(100)])
    spec = CropFlipSpec(pad=4)
    batch = args.array_batch or args.batch
    sampler = EpochSampler(n, batch, seed=0)
    out = []
    for backend, label in (("torch", "torch ArrayPipeline"), ("dali", "DALI")):
        pipe = build_pipeline(backend, split, fmt, sampler, spec, device=device)
        out.append(Contender("arrays", backend, label, pipe.epoch, backend))
    out.append(Contender(
        "arrays", "dataloader", f"per-sample DataLoader ({args.workers} workers)",
        lambda e: _loader(ArraySamples(images, spec, 0, e, fmt.mean, fmt.std), sampler.order(e), batch,
                          args.workers, device)))
    return out


def file_contenders(section: str, split: FileSplit, fmt_name: str, size: int, args: argparse.Namespace,
                    device: torch.device) -> list[Contender]:
    fmt = get_format(fmt_name)
    spec = ResizedCropSpec()
    sampler = EpochSampler(len(split.labels), args.batch, seed=0)
    from pipelines.dali_files import DaliFilePipeline
    from pipelines.torch_files import FilePipeline
    from pipelines.views import eval_view

    dali = DaliFilePipeline(split.paths, split.labels, sampler, fmt.mean, fmt.std, spec, size, eval_view(fmt),
                            device=device, num_threads=args.workers)
    pil = FilePipeline(split.paths, split.labels, sampler, fmt.mean, fmt.std, spec, size, eval_view(fmt),
                       device=device, workers=args.workers)
    return [
        Contender(section, "dali", "DALI", dali.epoch, "dali"),
        Contender(section, "torch", f"torch/Pillow thread pool ({args.workers} threads)", pil.epoch, "torch"),
        Contender(section, "dataloader", f"per-sample Pillow DataLoader ({args.workers} workers)",
                  lambda e: _loader(JpegSamples(split.paths, spec, size, 0, e, fmt.mean, fmt.std), sampler.order(e),
                                    args.batch, args.workers, device)),
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

def machine_name(device: torch.device) -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    name = f"{platform.machine()} {cores} cores"
    if device.type == "cuda":
        name += f", {torch.cuda.get_device_name(device)}"
    return name


def write_auto_table(path: Path, results: dict[str, dict[str, float]], sections: dict[str, str], device: torch.device,
                     contenders: list[Contender], note: str = "") -> dict[str, dict]:
    """Merge this machine's choice per dataset kind into the table (other device types kept)."""
    table = load_auto_table(path)
    backend_of = {(c.section, c.name): c.backend for c in contenders if c.backend}
    written = {}
    for section, kind in sections.items():
        figures = {backend_of[(section, n)]: v for n, v in results.get(section, {}).items() if (section, n) in backend_of}
        if len(figures) < 2:
            continue
        written[auto_key(kind, device)] = {
            "backend": max(figures, key=figures.get),
            "img_s": {k: round(v) for k, v in figures.items()},
            "section": section,
            "machine": machine_name(device),
            "measured": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        }
        if note:
            written[auto_key(kind, device)]["note"] = note
    table.setdefault("comment", "Written by `python -m pipelines.bench --write-auto-table`; read by data.pipeline=auto.")
    table["entries"].update(written)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return written


def report(results: dict[str, dict[str, list[float]]], contenders: list[Contender], device: torch.device) -> dict:
    labels = {(c.section, c.name): c.label for c in contenders}
    medians: dict[str, dict[str, float]] = {}
    print(f"\n{'section':<10} {'contender':<44} {'median img/s':>14}  runs (img/s)")
    for section, per in results.items():
        medians[section] = {}
        for name, runs in per.items():
            med = statistics.median(runs)
            medians[section][name] = med
            shown = ", ".join(f"{r:,.0f}" for r in runs)
            print(f"{section:<10} {labels[(section, name)]:<44} {med:>14,.0f}  {shown}")
        base = medians[section].get("dataloader")
        dali = medians[section].get("dali")
        for name, med in medians[section].items():
            if name != "dataloader" and base:
                print(f"{'':<10} ratio {name} / per-sample DataLoader: {med / base:.2f}x")
        if dali and medians[section].get("torch"):
            print(f"{'':<10} ratio dali / torch: {dali / medians[section]['torch']:.2f}x")
    for (section, name, dev), target in TARGETS.items():
        if dev == device.type and section in medians and name in medians[section]:
            got = medians[section][name]
            verdict = "met" if got >= target else "MISSED"
            print(f"target {section}/{name} on {dev}: {got:,.0f} img/s vs {target:,.0f}: {verdict}")
    return medians


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--sections", default="", help="comma-separated subset of arrays,jpeg,jpeg224 (default: all for the device)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--array-batch", type=int, default=0, help="batch size of the arrays section (default: --batch)")
    parser.add_argument("--batches", type=int, default=40,
                        help="timed batches per contender per repeat (at most one epoch minus the warm-up)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches before each measurement")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers, DALI and Pillow threads")
    parser.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--array-images", type=int, default=50_000)
    parser.add_argument("--jpeg-images", type=int, default=5_000)
    parser.add_argument("--jpeg224-images", type=int, default=4_096)
    parser.add_argument("--jpeg224-side", type=int, default=400, help="side of the generated ImageNet-like JPEGs")
    parser.add_argument("--data-dir", type=Path, help="keep generated JPEG folders here (default: a temporary folder)")
    parser.add_argument("--write-auto-table", nargs="?", const=AUTO_TABLE, type=Path, metavar="PATH",
                        help=f"record the faster backend per dataset kind for this device type (default {AUTO_TABLE.name})")
    parser.add_argument("--note", default="", help="remark stored with the auto-table entries (e.g. machine load)")
    parser.add_argument("--json", type=Path, help="also write the medians as JSON here")
    args = parser.parse_args(argv)
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
    print(f"pipelines.bench on {machine_name(device)}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"batch {args.batch} (arrays {args.array_batch or args.batch}), {args.repeats} repeats x up to "
          f"{args.batches} batches after {args.warmup} warm-up, {args.workers} workers/threads")
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
        results: dict[str, dict[str, list[float]]] = {}
        for rep in range(args.repeats):
            for c in contenders:
                rate = time_batches(c.batches, rep, args.batches, args.warmup, device)
                results.setdefault(c.section, {}).setdefault(c.name, []).append(rate)
                print(f"  repeat {rep + 1}: {c.section:<8} {c.label:<44} {rate:>12,.0f} img/s", flush=True)
        medians = report(results, contenders, device)
    if args.json:
        args.json.write_text(json.dumps({"device": machine_name(device), "medians": medians}, indent=2) + "\n")
    if args.write_auto_table:
        kinds = {"arrays": "array", "jpeg": "files", "jpeg224": "files"}
        chosen = {s: kinds[s] for s in sections if not (s == "jpeg" and "jpeg224" in sections)}
        written = write_auto_table(args.write_auto_table, medians, chosen, device, contenders, args.note)
        for key, entry in written.items():
            print(f"auto table {args.write_auto_table}: {key} -> {entry['backend']} ({entry['img_s']})")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2)
