"""Convert a RepDistiller/mdistiller `ckpt_epoch_240.pth` into model.safetensors + model.json.

    python -m rrd_fast.import_teacher ckpt.pth --arch resnet32x4 --out DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from pipelines.formats import get_format
from rrd_fast.checkpoint import CheckpointError, write_model_checkpoint
from rrd_fast.cli import run_cli
from rrd_fast.checkpoint import load_teacher


def import_teacher(pth: Path, arch: str, out: Path, dataset: str = "cifar100") -> dict:
    fmt = get_format(dataset)
    model, provenance = load_teacher(pth, arch, fmt.num_classes, fmt.channels)
    with torch.inference_mode():
        logits = model(torch.zeros(2, fmt.channels, fmt.image_size, fmt.image_size))
    if tuple(logits.shape) != (2, fmt.num_classes) or not torch.isfinite(logits).all():
        raise CheckpointError(f"{pth}: forward check failed (logits shape {tuple(logits.shape)}, finite={bool(torch.isfinite(logits).all())})")
    sidecar = {
        "arch": arch,
        "num_classes": fmt.num_classes,
        "in_channels": fmt.channels,
        "image_size": fmt.image_size,
        "normalization": {"mean": list(fmt.mean), "std": list(fmt.std)},
        "dataset": {"format": dataset},
        "method": "imported",
        "source": {"path": str(pth), "sha256": provenance["sha256"]},
    }
    return write_model_checkpoint(out, model, sidecar)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rrd_fast.import_teacher", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--arch", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--dataset", default="cifar100", help="dataset format the teacher was trained on (class count, normalisation)")
    args = parser.parse_args(argv)
    meta = import_teacher(args.checkpoint, args.arch, args.out, args.dataset)
    print(f"wrote {args.out}/model.safetensors ({meta['arch']}, {meta['num_classes']} classes, sha256 {meta['sha256'][:12]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
