"""Command line of the sweep runner.

    python -m rrd_fast.sweep SWEEP.yaml [--only pair=A,B method=kd seed=0] [--dry-run]
                                        [--parallel N] [--executor local|slurm|submitit-local]
    python -m rrd_fast.sweep report SWEEP_DIR

Exit codes: 0 every selected run (and transfer probe) finished, 1 some run or probe failed (the
others ran), 2 bad input or a teacher below teacher_min_top1 (nothing, or no student, was started).
"""

from __future__ import annotations

if __name__ == "__main__":  # before torch loads: glibc reads its malloc tunables only at process start
    from rrd_fast.malloc_tuning import reexec_with_malloc_tuning

    reexec_with_malloc_tuning()  # opt out with RRD_FAST_NO_MALLOC_TUNING=1

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from rrd_fast.cli import run_cli  # noqa: E402


def report_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m rrd_fast.sweep report",
                                     description="Write results.json, .md, .csv and .png of a sweep folder.")
    parser.add_argument("sweep_dir", type=Path, help="the sweep's output_dir (holds sweep.json)")
    args = parser.parse_args(argv)
    from rrd_fast.sweep.report import write_report

    paths = write_report(args.sweep_dir)
    print(paths["md"].read_text(), end="")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "report":
        return report_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m rrd_fast.sweep", description="Run a sweep, or `report SWEEP_DIR`.")
    parser.add_argument("sweep", type=Path, help="the sweep YAML file")
    parser.add_argument("--only", nargs="+", action="extend", default=[], metavar="KEY=VALUES",
                        help="run only pair=..., method=..., seed=... (comma-separated values; teachers follow)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, what is done and the time left; run nothing")
    parser.add_argument("--parallel", type=int, default=1, metavar="N",
                        help="N runs at once in worker processes, one GPU each when GPUs are visible")
    parser.add_argument("--executor", default="local", help="local (default), slurm or submitit-local (submitit extra)")
    args = parser.parse_args(argv)
    from rrd_fast.sweep.driver import run_sweep
    from rrd_fast.sweep.spec import load_sweep

    spec = load_sweep(args.sweep)
    return run_sweep(spec, args.only, args.executor, args.parallel, args.dry_run,
                     log=lambda msg: print(msg, flush=True))


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
