"""Workers end when their launcher dies.

`accelerate launch` and torchrun start the training processes as their children; if the
launcher is killed with SIGKILL it cannot pass anything on, and without this its workers
would train on unseen. A worker started by a launcher therefore asks for SIGTERM when its
parent dies. SIGTERM is what a scheduler sends at preemption too: the trainer finishes the
step, writes an exact mid-epoch resume state and exits 143, so the run folder stays
resumable (a SIGTERM while the trainer is still being built ends the process as usual:
every file is written atomically, and the lock it leaves is taken over as stale).

Only processes started by a launcher are watched, never a plain `python rrd_fast/train.py`:
such a run's parent is a shell, and a run started with `nohup`, `setsid` or `&` plus
`disown` is meant to outlive it. A launcher is recognised by the variables it exports to
its workers and users do not set themselves: torchrun's (and `accelerate launch
--multi_gpu`'s) LOCAL_RANK and TORCHELASTIC_RUN_ID, and ACCELERATE_DYNAMO_MODE, which
every `accelerate launch` exports (ACCELERATE_USE_CPU is not a sign: users export it).

On Linux the kernel delivers the signal (prctl PR_SET_PDEATHSIG; it fires when the thread
that started us ends, and launchers start workers from their main thread); the parent is
re-read after the call, since it may have died just before. Elsewhere a daemon thread polls the
parent's pid. Both are armed once, after the malloc re-exec (which keeps the pid and parent).
This module must not import torch: it runs before the heavy imports.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from typing import Mapping

LAUNCHER_VARS = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "ACCELERATE_DYNAMO_MODE")
PR_SET_PDEATHSIG = 1
POLL_S = 0.5


def started_by_launcher(environ: Mapping[str, str] | None = None) -> bool:
    """True when a launcher (torchrun, `accelerate launch`) started this process."""
    environ = os.environ if environ is None else environ
    return any(name in environ for name in LAUNCHER_VARS)


def _terminate_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def _arm_pdeathsig(parent: int) -> bool:
    """Ask the kernel for SIGTERM when the parent dies; False where prctl is not available."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # the C library this interpreter is linked with
    except (OSError, AttributeError):
        return False
    if prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:  # died between reading its pid and the prctl call: no signal will come
        _terminate_self()
    return True


def _poll(parent: int, interval: float) -> None:
    while os.getppid() == parent:
        time.sleep(interval)
    _terminate_self()


def start_poll_thread(parent: int, interval: float = POLL_S) -> threading.Thread:
    """The portable watch: a daemon thread that sends SIGTERM to this process once its parent changes."""
    thread = threading.Thread(target=_poll, args=(parent, interval), name="parent-watch", daemon=True)
    thread.start()
    return thread


def watch_parent(method: str = "auto") -> str:
    """Arm the watch on the current parent; returns how: "pdeathsig" or "poll".

    `method` "poll" forces the thread, "auto" prefers the kernel signal on Linux.
    """
    parent = os.getppid()
    if method == "auto" and sys.platform.startswith("linux") and _arm_pdeathsig(parent):
        return "pdeathsig"
    start_poll_thread(parent)
    return "poll"


def watch_parent_if_launched(environ: Mapping[str, str] | None = None) -> str | None:
    """`watch_parent()` when a launcher started this process, else nothing (None)."""
    return watch_parent() if started_by_launcher(environ) else None
