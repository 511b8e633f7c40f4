"""`python -m rrd_fast.transfer RUN_DIR --data stl10 --root DIR [--bn train|eval] [key=value ...]`.

Flags override the YAML config (`--config`), and `key=value` overrides override both.
"""

from __future__ import annotations

if __name__ == "__main__":  # before torch loads: glibc reads its malloc tunables only at process start
    from rrd_fast.malloc_tuning import reexec_with_malloc_tuning

    reexec_with_malloc_tuning()  # opt out with RRD_FAST_NO_MALLOC_TUNING=1

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

from rrd_fast.cli import run_cli  # noqa: E402
from rrd_fast.transfer.config import ProbeConfig, load_probe_config  # noqa: E402


def parse_config(argv: list[str] | None = None) -> tuple[Path, ProbeConfig, bool]:
    parser = argparse.ArgumentParser(prog="python -m rrd_fast.transfer",
                                     description="Linear probe of a frozen student on STL-10 or Tiny-ImageNet.")
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a training run folder (model.safetensors + model.json)")
    parser.add_argument("--config", type=Path, help="YAML probe config (keys as in rrd_fast/transfer/config.py)")
    parser.add_argument("--data", choices=["stl10", "tiny_imagenet"], help="target data set")
    parser.add_argument("--root", help="target data set folder")
    parser.add_argument("--bn", choices=["train", "eval"],
                        help="BatchNorm mode while probing: train (the reference's; running statistics adapt) or eval")
    parser.add_argument("--feature-views", type=int, metavar="V",
                        help="bn=eval only: precompute the features of V augmented views once (0: none)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier probe of the same kind")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. epochs=30 lr=0.1")
    args = parser.parse_intermixed_args(argv)
    flags = {"dataset": args.data, "root": args.root, "bn": args.bn, "feature_views": args.feature_views}
    return args.run_dir, load_probe_config(args.config, args.overrides, values=flags), args.overwrite


def main(argv: list[str] | None = None) -> int:
    run_dir, cfg, overwrite = parse_config(argv)
    from rrd_fast.transfer.probe import LinearProbe  # after argument errors, so `--help` stays fast

    result = LinearProbe(run_dir, cfg, overwrite=overwrite).fit()
    print(f"{run_dir.name} -> {cfg.dataset} (bn={cfg.bn}): last-epoch top-1 {result['top1_last']:.2f}, "
          f"best top-1 {result['top1_best']:.2f} (epoch {result['best_epoch']}), {result['wall_time_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
