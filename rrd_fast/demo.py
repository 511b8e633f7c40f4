"""The README demo: real Fashion-MNIST on a CPU, teacher → student with KD and RRD+KD.

    python -m rrd_fast.demo [--data DIR] [--out runs/demo]

It trains a teacher, the student alone, the student with KD and with RRD+KD, then
prints top-1 (last and best epoch), wall time and images/s for each.
"""

from __future__ import annotations

if __name__ == "__main__":  # before torch loads: glibc reads its malloc tunables only at process start
    from rrd_fast.malloc_tuning import reexec_with_malloc_tuning

    reexec_with_malloc_tuning()  # opt out with RRD_FAST_NO_MALLOC_TUNING=1

import argparse
import gzip
import json
import time
import urllib.request
from pathlib import Path

from pipelines.formats.fashion_mnist import DEBIAN_FASHION_MNIST
from rrd_fast.atomic import atomic_path, write_json_atomic
from rrd_fast.cli import RunError, run_cli
from rrd_fast.config import load_config

OFFICIAL_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def find_data(requested: Path | None, cache: Path) -> Path:
    """A folder with the four IDX files: the one given, Debian's package, or the official download."""
    for candidate in [requested] if requested else [DEBIAN_FASHION_MNIST, cache]:
        if candidate and all((candidate / f).exists() or (candidate / f.removesuffix(".gz")).exists() for f in FILES):
            return candidate
    if requested:
        raise RunError(f"{requested}: no Fashion-MNIST IDX files (expected {', '.join(FILES)})")
    print(f"Fashion-MNIST not found locally (apt-get install dataset-fashion-mnist provides it); downloading to {cache}")
    cache.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        try:
            with urllib.request.urlopen(OFFICIAL_URL + name, timeout=60) as response, atomic_path(cache / name) as tmp:
                tmp.write_bytes(response.read())
            gzip.open(cache / name).read(16)
        except OSError as exc:
            raise RunError(f"cannot download {OFFICIAL_URL + name} ({exc}); pass --data DIR with the IDX files") from None
    return cache


def demo_runs(teacher: str, student: str, epochs_teacher: int, epochs: int) -> list[tuple[str, list[str]]]:
    """(run name, overrides) in training order; the teacher comes first, the others distill from it."""
    kd = ["method.name=kd", "method.gamma=0.1", "method.alpha=0.9", "teacher.checkpoint={out}/teacher"]
    rrd_kd = ["method.name=rrd", "method.gamma=1.0", "method.alpha=1.0", "method.beta=1.0",
              "teacher.checkpoint={out}/teacher", "method.options={rrd: {queue_size: 4096}}"]
    return [
        ("teacher", [f"student.arch={teacher}", f"optim.epochs={epochs_teacher}"]),
        ("student", [f"student.arch={student}", f"optim.epochs={epochs}"]),
        ("kd", [f"student.arch={student}", f"optim.epochs={epochs}", *kd]),
        ("rrd_kd", [f"student.arch={student}", f"optim.epochs={epochs}", *rrd_kd]),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rrd_fast.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--teacher", default="resnet20")
    parser.add_argument("--student", default="resnet8")
    parser.add_argument("--epochs-teacher", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-samples", type=int, default=20000, help="first N training images (0: all 60k)")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args(argv)
    data = find_data(args.data, Path("data/fashion-mnist"))
    out = args.out.resolve()
    from rrd_fast.trainer import Trainer

    common = [f"output_dir={out}", "data.format=fashion_mnist", f"data.root={data}", f"data.batch_size={args.batch_size}",
              f"data.train_limit={args.train_samples}", "data.eval_batch_size=1000", "train.mixed_precision=no",
              "optim.lr=0.1", f"optim.lr_scaling=linear", "optim.base_batch_size=128"]
    rows = []
    for name, overrides in demo_runs(args.teacher, args.student, args.epochs_teacher, args.epochs):
        overrides = [o.replace("{out}", str(out)) for o in overrides]
        epochs = int(next(o for o in overrides if o.startswith("optim.epochs=")).split("=")[1])
        milestones = f"optim.milestones=[{max(1, epochs - 1)}]"  # one decay for the last epoch
        cfg = load_config(None, [f"name={name}", *common, milestones, *overrides])
        print(f"== {name}: {cfg.student.arch}, method {cfg.method.name} (gamma={cfg.method.gamma}, alpha={cfg.method.alpha}, "
              f"beta={cfg.method.beta}), {cfg.optim.epochs} epochs", flush=True)
        start = time.perf_counter()
        summary = Trainer(cfg).fit()
        rows.append({"run": name, "model": cfg.student.arch, "method": "vanilla" if name == "student" else
                     {"teacher": "vanilla", "kd": "KD", "rrd_kd": "RRD+KD"}[name],
                     "top1_last": summary["top1_last"], "top1_best": summary["top1_best"],
                     "wall_s": time.perf_counter() - start, "images_per_s": summary["images_per_s"]})
    table = ["| run | model | method | top-1 last | top-1 best | wall time (s) | images/s |",
             "|---|---|---|---|---|---|---|"]
    table += [f"| {r['run']} | {r['model']} | {r['method']} | {r['top1_last']:.2f} | {r['top1_best']:.2f} | "
              f"{r['wall_s']:.0f} | {r['images_per_s']:.0f} |" for r in rows]
    print("\n".join(["", f"Fashion-MNIST ({args.train_samples or 60000} training images, 10k test), CPU, fp32", *table]))
    write_json_atomic(out / "demo.json", rows)
    with atomic_path(out / "demo.md") as tmp:
        tmp.write_text("\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
