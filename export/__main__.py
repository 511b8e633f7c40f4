"""`python -m export RUN_DIR --backend B [--precision P] [--batch-sizes 1,8,64,256] --out DIR`."""

from __future__ import annotations

import sys
from typing import Sequence

from export.artifact import check_out_folder
from export.base import PRECISIONS, get_backend, list_backends, parse_batch_sizes
from export.cli import OneLineParser, run_cli
from export.data import data_source
from export.exporter import DEFAULT_BATCH_SIZES, DEFAULT_CALIB_SAMPLES, export_checkpoint, resolve_device
from rrd_fast.checkpoint import read_sidecar


TRUST_NOTE = (
    "Trusting exported artifacts: artifact.json records every file's sha256, which catches corruption but not "
    "someone who can write the folder (they can change a file and its sha together). An AOTInductor .pt2 package "
    "is a shared library and a TensorRT engine can load plugin libraries, so loading either runs native code from "
    "the folder: only load ones you built, or whose writers you trust. export.bench and load_artifact refuse such "
    "artifacts when the folder or a file in it is writable by group or others, or owned by another user, unless "
    "--trust-artifact (trust=True) is given; export writes its folder writable by you only. ONNX files and eager "
    "checkpoints hold no code and load without trust. artifact.json records who built the artifact (host, user, "
    "time)."
)


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="python -m export", description="Export a student checkpoint to a deployable artifact.",
                      epilog=TRUST_NOTE)
    p.add_argument("run_dir", help="run or checkpoint folder holding model.safetensors and model.json")
    p.add_argument("--backend", required=True, help=f"one of: {', '.join(list_backends())}")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS)
    p.add_argument("--batch-sizes", default=",".join(map(str, DEFAULT_BATCH_SIZES)),
                   help="comma-separated; static backends build one engine per size")
    p.add_argument("--out", required=True, help="artifact folder to write")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="device the artifact is built for (auto: cuda if visible, else cpu)")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--dynamic", dest="dynamic", action="store_true", default=None,
                       help="one artifact for every batch size")
    shape.add_argument("--static", dest="dynamic", action="store_false", help="one artifact per batch size")
    p.add_argument("--data", default=None, help="training config (YAML) whose data section locates the dataset "
                                               "(default: the checkpoint's own dataset); used for int8 calibration")
    p.add_argument("--calib-samples", type=int, default=DEFAULT_CALIB_SAMPLES,
                   help="training images used to calibrate int8")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    backend = get_backend(args.backend)
    check_out_folder(args.out)
    device = "cuda" if args.device == "auto" and backend.name == "tensorrt" else resolve_device(args.device)
    sizes = parse_batch_sizes(args.batch_sizes)
    backend.check(args.precision, device)
    data = data_source(read_sidecar(args.run_dir), args.data) if args.precision == "int8" else None
    sidecar = export_checkpoint(args.run_dir, backend.name, args.out, args.precision, device, sizes,
                                args.dynamic, data, args.calib_samples)
    files = ", ".join(f["name"] for f in sidecar["files"])
    shape = "any batch size" if sidecar["dynamic_batch"] else f"batch sizes {sidecar['batch_sizes']}"
    print(f"wrote {args.out}: {backend.name} {args.precision} on {device} ({shape}); files: {files}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(lambda: main()))
