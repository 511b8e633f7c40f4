"""One planned run or transfer probe in its own process: `python -m rrd_fast.sweep.worker SWEEP_DIR RUN` (--parallel N).

The outcome goes to SWEEP_DIR/status/RUN.json; the exit code is 0 when the run finished.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # all before torch loads
    # The sweep gives each worker its share of the cores (runner.CPUS_VAR); the trainer's automatic
    # thread count follows the cores a process may run on.
    if os.environ.get("RRD_FAST_SWEEP_CPUS") and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(c) for c in os.environ["RRD_FAST_SWEEP_CPUS"].split(",")})
    from rrd_fast.malloc_tuning import reexec_with_malloc_tuning

    reexec_with_malloc_tuning()  # glibc reads its malloc tunables only at process start
    from rrd_fast.cli import keep_going_without_readers

    keep_going_without_readers()  # a run must not die of a print once its sweep's output pipe is gone


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m rrd_fast.sweep.worker SWEEP_DIR RUN", file=sys.stderr)
        return 2
    from rrd_fast.sweep.runner import execute_job

    return 0 if execute_job(args[0], args[1])["status"] == "done" else 1


if __name__ == "__main__":
    from rrd_fast.cli import run_cli

    raise SystemExit(run_cli(main))
