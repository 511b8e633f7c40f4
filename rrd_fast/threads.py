"""How many CPU threads torch uses in each process (`train.threads`), and applying that.

torch's default does not know how many processes share the machine, so N processes each
start a full set of threads and oversubscribe the cores; the launchers' answer,
OMP_NUM_THREADS=1 per process, leaves most cores idle on CPU runs. Auto
(`train.threads: 0`) gives each of the machine's processes an equal share of the cores this
process may run on. Auto ignores an OMP_NUM_THREADS already set (a launcher's 1 included);
`train.threads=N` pins the count.
"""

from __future__ import annotations

import os
from collections.abc import Collection, MutableMapping

import torch

from rrd_fast.config import RunConfig


def local_processes(environ: MutableMapping[str, str] | None = None) -> int:
    """Processes of this run on this machine: LOCAL_WORLD_SIZE (torchrun, accelerate launch), else 1."""
    environ = os.environ if environ is None else environ
    try:
        return max(int(environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def auto_threads(affinity: Collection[int] | None = None, environ: MutableMapping[str, str] | None = None) -> int:
    """The cores this process may run on divided by the local process count, at least 1."""
    if affinity is None:
        affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    return max(len(affinity) // local_processes(environ), 1)


def resolve_threads(cfg: RunConfig, affinity: Collection[int] | None = None,
                    environ: MutableMapping[str, str] | None = None) -> int:
    """Resolve `cfg.train.threads` (0: `auto_threads`) and apply it: torch's intra-op threads, and
    OMP_NUM_THREADS in `environ` (default os.environ) for child processes. Returns the count."""
    environ = os.environ if environ is None else environ
    threads = int(cfg.train.threads) or auto_threads(affinity, environ)
    torch.set_num_threads(threads)
    environ["OMP_NUM_THREADS"] = str(threads)
    return threads
