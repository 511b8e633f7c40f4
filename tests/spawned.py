"""Running a test's worker on several gloo ranks: a free port and spawned processes with a deadline."""

from __future__ import annotations

import socket
import time
from typing import Any, Callable

import pytest
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker: Callable[..., None], *args: Any, nprocs: int = 2, timeout: float = 300.0) -> None:
    """worker(rank, port, *args) on `nprocs` spawned processes; fails the test past `timeout` seconds
    (killing them) and re-raises a worker's exception."""
    ctx = mp.start_processes(worker, args=(free_port(), *args), nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{nprocs}-process run did not finish within {timeout:.0f} s")
