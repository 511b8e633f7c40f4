"""The README demo: a small sweep on real Fashion-MNIST on a CPU, reported as mean ± std over seeds.

    python -m rrd_fast.demo [--data DIR] [--out runs/demo] [--quick]

It runs configs/sweeps/fashion_mnist_demo.yaml through the sweep machinery (rrd_fast.sweep):
a resnet20 teacher once, then resnet8 alone and distilled with KD, RRD and RRD+KD, two seeds
each, the distillation runs reading the teacher from its feature cache. It then prints the
report's table (last and best epoch) and says whether each method's difference from the
student alone exceeds the spread over seeds. `--quick` runs the same flow on the first 128
training images in seconds (the CI test). A rerun skips finished runs and resumes interrupted ones.
"""

from __future__ import annotations

if __name__ == "__main__":  # before torch loads: glibc reads its malloc tunables only at process start
    from rrd_fast.malloc_tuning import reexec_with_malloc_tuning

    reexec_with_malloc_tuning()  # opt out with RRD_FAST_NO_MALLOC_TUNING=1

import argparse
import json
import os
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.errors import DataError
from pipelines.formats.fashion_mnist import DEBIAN_FASHION_MNIST, download_fashion_mnist
from rrd_fast.atomic import atomic_path
from rrd_fast.cli import RunError, run_cli

OFFICIAL_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
DEMO_SWEEP = Path(__file__).resolve().parent.parent / "configs" / "sweeps" / "fashion_mnist_demo.yaml"
# --quick: the same sweep on the first 128 training and 200 test images, 2 epochs, for a CI test of the whole
# flow. Those images are copied into OUT/data as IDX files, so that no run decompresses the whole 30 MB.
QUICK_TRAIN, QUICK_TEST = 128, 200
QUICK = ["data.train_limit=0", "data.eval_limit=0", "data.batch_size=32", f"data.eval_batch_size={QUICK_TEST}",
         "optim.epochs=2", "optim.milestones=[1]", "teacher.cache_views=2",
         "train.threads=1"]  # batches this small gain nothing from more threads
QUICK_TEACHER = ["optim.epochs=2", "optim.milestones=[1]"]
QUICK_TEACHER_MIN_TOP1 = 12.0  # above chance (10%): the acceptance check runs, and a teacher this small passes it
# Convenience names for the seed-0 runs, used by the README's export examples.
ALIASES = {"student": "vanilla", "kd": "kd", "rrd": "rrd", "rrd_kd": "rrd_kd"}


def find_data(requested: Path | None, cache: Path) -> Path:
    """A folder with the four IDX files: the one given, Debian's package, or the official download."""
    for candidate in [requested] if requested else [DEBIAN_FASHION_MNIST, cache]:
        if candidate and all((candidate / f).exists() or (candidate / f.removesuffix(".gz")).exists() for f in FILES):
            return candidate
    if requested:
        raise RunError(f"{requested}: no Fashion-MNIST IDX files (expected {', '.join(FILES)})")
    print(f"Fashion-MNIST not found locally (apt-get install dataset-fashion-mnist provides it); downloading to {cache}")
    try:
        return download_fashion_mnist(cache, OFFICIAL_URL)
    except DataError as exc:
        raise RunError(f"{exc}; or pass --data DIR with the IDX files") from None


def head_copy(data: Path, out: Path, n_train: int, n_test: int) -> Path:
    """The first n_train / n_test images of the real files, written as raw IDX files into `out`."""
    from pipelines.formats.fashion_mnist import read_idx_images, read_idx_labels

    def idx(name: str) -> Path:
        raw = data / name
        return raw if raw.exists() else data / f"{name}.gz"

    out.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = read_idx_images(idx(f"{prefix}-images-idx3-ubyte"))[:n]
        labels = read_idx_labels(idx(f"{prefix}-labels-idx1-ubyte"))[:n]
        with atomic_path(out / f"{prefix}-images-idx3-ubyte") as tmp:
            tmp.write_bytes(struct.pack(">IIII", 2051, len(images), 28, 28) + images.tobytes())
        with atomic_path(out / f"{prefix}-labels-idx1-ubyte") as tmp:
            tmp.write_bytes(struct.pack(">II", 2049, len(labels)) + labels.astype(np.uint8).tobytes())
    return out


def demo_spec(data: Path, out: Path, quick: bool, sweep_file: Path = DEMO_SWEEP) -> Any:
    """The demo's sweep file with this machine's data folder and output folder (and --quick's limits)."""
    from rrd_fast.config import _yaml as parse_yaml
    from rrd_fast.sweep.spec import overrides_list, parse_sweep

    tree = parse_yaml(sweep_file.read_text())
    tree["output_dir"] = str(out)
    tree["teacher_cache"] = str(out / "teacher_cache")
    tree["overrides"] = [*overrides_list(tree.get("overrides"), "overrides"), f"data.root={json.dumps(str(data))}",
                         *(QUICK if quick else [])]
    if quick:
        tree["teacher_overrides"] = [*overrides_list(tree.get("teacher_overrides"), "teacher_overrides"), *QUICK_TEACHER]
        tree["teacher_min_top1"] = QUICK_TEACHER_MIN_TOP1
    return parse_sweep(tree, sweep_file)


def in_words(results: dict[str, Any]) -> list[str]:
    """Per epoch kind, which methods differ from the student alone by more than the seed spread."""
    from rrd_fast.sweep.report import compare_to_student

    lines = []
    for pair in results["pairs"]:
        entries = compare_to_student(pair["rows"])
        for which, when in (("top1_last", "last"), ("top1_best", "best")):
            beyond = [f"{e['label']} ({e[which]['diff']:+.2f})" for e in entries if e[which]["exceeds"]]
            within = [f"{e['label']} ({e[which]['diff']:+.2f})" for e in entries if e[which]["exceeds"] is False]
            unknown = [e["label"] for e in entries if e[which]["exceeds"] is None]
            text = f"At the {when} epoch, against the student alone, "
            text += (f"{', '.join(beyond)} {'differs' if len(beyond) == 1 else 'differ'} by more than the pooled seed std"
                     if beyond else "no method differs by more than the pooled seed std")
            text += f"; {', '.join(within)} {'stays' if len(within) == 1 else 'stay'} within it" if within else ""
            text += f"; {', '.join(unknown)}: one seed, spread unknown" if unknown else ""
            lines.append(text + ".")
    return lines


def link_aliases(out: Path, results: dict[str, Any]) -> None:
    """runs/demo/{student,kd,rrd,rrd_kd} -> the seed-0 run folders (relative symlinks; real folders are left alone)."""
    for pair in results["pairs"]:
        rows = {r["method"]: r for r in pair["rows"]}
        for alias, method in ALIASES.items():
            run = rows.get(method, {}).get("runs", {}).get("0")
            link = out / alias
            if run is None or (link.exists() and not link.is_symlink()):
                continue
            link.unlink(missing_ok=True)
            os.symlink(run, link)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rrd_fast.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--quick", action="store_true", help="the same flow on a few hundred images, in seconds")
    args = parser.parse_args(argv)
    data = find_data(args.data, Path("data/fashion-mnist"))
    out = args.out.resolve()
    if args.quick:
        data = head_copy(data, out / "data", QUICK_TRAIN, QUICK_TEST)
    spec = demo_spec(data, out, args.quick)
    from rrd_fast.sweep.driver import run_sweep

    start = time.perf_counter()
    code = run_sweep(spec, log=lambda msg: print(msg, flush=True))
    elapsed = time.perf_counter() - start
    results = json.loads((out / "results.json").read_text())
    link_aliases(out, results)
    print("\n" + (out / "results.md").read_text())
    for line in in_words(results):
        print(line)
    from rrd_fast.sweep.plan import read_plan

    cfg = next(iter(read_plan(out).runs.values())).load()
    n_train, n_test = (QUICK_TRAIN, QUICK_TEST) if args.quick else (cfg.data.train_limit or 60000, cfg.data.eval_limit or 10000)
    print(f"\nFashion-MNIST ({n_train} training images, {n_test} test images), "
          f"{'CUDA' if _cuda() else 'CPU'}; "
          f"the sweep took {elapsed / 60:.1f} min; report in {out}/results.{{md,csv,json,png}}")
    return code


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
