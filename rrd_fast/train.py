"""Train a teacher or distill a student.

    accelerate launch rrd_fast/train.py --config configs/cifar100/resnet32x4_resnet8x4_rrd_kd.yaml [key=value ...]
    python rrd_fast/train.py --resume runs/NAME

On Linux with glibc the process first restarts itself once with GLIBC_TUNABLES set
(rrd_fast/malloc_tuning.py); set RRD_FAST_NO_MALLOC_TUNING=1 to skip that. Started by a
launcher, it then stops (as on SIGTERM) when the launcher dies (rrd_fast/parent_watch.py), and
output that no one reads any more is dropped (rrd_fast/cli.py), so that the stop still checkpoints.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the package, not sibling modules
    _root = Path(__file__).resolve().parent.parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _root / "rrd_fast"]
    sys.path.insert(0, str(_root))

if __name__ == "__main__":  # before torch loads: glibc reads its malloc tunables only at process start
    from rrd_fast.malloc_tuning import reexec_with_malloc_tuning

    reexec_with_malloc_tuning()  # opt out with RRD_FAST_NO_MALLOC_TUNING=1
    from rrd_fast.parent_watch import watch_parent_if_launched

    watch_parent_if_launched()  # under a launcher: SIGTERM (checkpoint, exit 143) if it dies
    from rrd_fast.cli import keep_going_without_readers

    keep_going_without_readers()  # ... and the pipe it read our stderr from (accelerate >= 1.16) fails no write

import argparse  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import threading  # noqa: E402

from rrd_fast.atomic import DiskFullError  # noqa: E402
from rrd_fast.cli import RunError, run_cli  # noqa: E402
from rrd_fast.config import RunConfig, config_help, dump_config, load_config  # noqa: E402
from rrd_fast.run_dir import check_resumable, check_writable, disk_full_message  # noqa: E402


def resolved_for_print(cfg: RunConfig) -> RunConfig:
    """What the trainer would resolve before it starts: the method's weights and `mixed_precision: auto`."""
    import torch

    from rrd_fast.methods.objective import resolve_weights
    from rrd_fast.precision import resolve_mixed_precision

    cfg.method.gamma, cfg.method.alpha, cfg.method.beta = resolve_weights(cfg.method)
    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    cfg.train.mixed_precision = resolve_mixed_precision(cfg.train.mixed_precision, torch.device("cpu" if cpu else "cuda"))
    return cfg


def main(argv: list[str] | None = None, owns_process: bool = False) -> int:
    """The command line; `owns_process`: this process exists for this run alone (see `train`)."""
    parser = argparse.ArgumentParser(prog="rrd_fast/train.py", description="Train a teacher or distill a student.",
                                     epilog=config_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="YAML run config")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR exactly where it stopped")
    parser.add_argument("--rebuild-cache", action="store_true",
                        help="rebuild the teacher cache (teacher.cache) even if one exists, e.g. built for another run")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing run in the run folder (without it, a fresh run refuses such a folder)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (method weights and mixed precision included) as YAML and "
                             "exit without starting anything; it loads back with --config")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. optim.epochs=10 (keys below)")
    args = parser.parse_args(argv)
    if args.resume is not None:
        check_resumable(args.resume)
        cfg = load_config(args.resume / "config.yaml", args.overrides)
        if Path(cfg.run_dir).resolve() != args.resume.resolve():
            cfg.output_dir, cfg.name = str(args.resume.parent), args.resume.name
    else:
        cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump_config(resolved_for_print(cfg)), end="")
        return 0
    check_writable(cfg.run_dir)  # before the data, the teacher and the cache
    try:
        return train(cfg, args, owns_process)
    except DiskFullError as exc:
        if exc.path.resolve().is_relative_to(cfg.run_dir.resolve()):
            from rrd_fast.trainer import RESUME_FILE

            raise RunError(disk_full_message(exc.path, cfg.run_dir, cfg.run_dir / RESUME_FILE)) from None
        raise


def train(cfg: RunConfig, args: argparse.Namespace, owns_process: bool = False) -> int:
    """Build the trainer for `cfg` and run it; returns the process's exit code.

    From the start of training on, SIGTERM never kills the process: `fit` turns it into a checkpoint
    and a stop, and afterwards it only marks a stop. When one rank stops, the launcher sends SIGTERM
    to the others while they finish the same stop; that must not turn their exit 143 into death by
    the signal. In a process of its own SIGTERM is then ignored until exit; else the old handler returns.
    """
    from rrd_fast.trainer import Trainer, TrainingStopped  # after argument errors, so `--help` stays fast

    trainer = Trainer(cfg, resume=args.resume is not None, rebuild_cache=args.rebuild_cache, overwrite=args.overwrite)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, trainer.request_stop) if main_thread else None
    try:
        summary = trainer.fit()
    except TrainingStopped as stop:
        if trainer.accelerator.is_main_process:
            print(f"{cfg.name}: {stop}", file=sys.stderr, flush=True)
        return stop.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C: no checkpoint of this epoch was written
        last = trainer.state.epoch
        print(f"{cfg.name}: interrupted in epoch {last + 1}; the last checkpoint is at the end of epoch {last}: "
              f"resume with: python rrd_fast/train.py --resume {cfg.run_dir}", file=sys.stderr, flush=True)
        return 130
    finally:
        trainer.close()
        if main_thread:  # SIG_IGN, since interpreter shutdown resets Python-level handlers to the default
            signal.signal(signal.SIGTERM, signal.SIG_IGN if owns_process else previous or signal.SIG_DFL)
    if trainer.accelerator.is_main_process:
        print(f"{cfg.name}: last-epoch top-1 {summary['top1_last']:.2f}, best top-1 {summary['top1_best']:.2f} "
              f"(epoch {summary['best_epoch']}), {summary['images_per_s']:.0f} img/s, {summary['train_time_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(lambda: main(owns_process=True)))
