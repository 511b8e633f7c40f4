"""Restart the current process once with glibc malloc tuned for training.

glibc serves large blocks (activations, gradients) with mmap and returns them with
munmap, so every step re-faults the same hundreds of megabytes; raising the mmap and
trim thresholds keeps them in the heap, which speeds up CPU training markedly. The
setting is read only when a process starts, hence the re-exec.
The process keeps its PID, argv, working directory and environment (launcher and
torch.distributed variables included), so it is safe under `accelerate launch`.

The same start-up step sets OMP_WAIT_POLICY=PASSIVE unless the user chose how OpenMP
threads wait (OMP_WAIT_POLICY or GOMP_SPINCOUNT set; GOMP_SPINCOUNT=300000 restores
libgomp's own default). libgomp's default has every idle thread spin up to 300000
times at each barrier before it sleeps, and only shortens that when the process has more
threads than CPUs it may run on; a second job on the same cores is invisible to it, so the
spinning takes the CPU time that job and this one's busy threads need. libgomp reads the
variable once, when torch loads it, so it is set here, in this process's environment, before
any torch import, and the re-executed process inherits it.

This module must not import torch: it runs before the heavy imports.
"""

from __future__ import annotations

import os
import sys
from typing import Mapping, MutableMapping, Sequence

TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184"
TUNABLES_VAR = "GLIBC_TUNABLES"
OPT_OUT_VAR = "RRD_FAST_NO_MALLOC_TUNING"
# Either set: the user chose. Not KMP_BLOCKTIME: `accelerate launch` sets it on every CPU launch, and
# libgomp (torch's OpenMP on Linux) does not read it.
WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
WAIT_DEFAULT = {"OMP_WAIT_POLICY": "PASSIVE"}
# Set in the re-executed process, so that a runtime that strips GLIBC_TUNABLES (secure
# execution) cannot make us loop.
DONE_VAR = "RRD_FAST_MALLOC_TUNED"


def glibc_version() -> str | None:
    """'glibc 2.36' on glibc systems, None elsewhere (musl, macOS, Windows)."""
    try:
        value = os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):
        return None
    return value if value and value.startswith("glibc") else None


def should_reexec(environ: Mapping[str, str], platform: str = sys.platform, libc: str | None = "") -> bool:
    """True when the tunables are not set yet, the user did not opt out, and glibc is the C library."""
    if libc == "":
        libc = glibc_version()
    return (
        platform.startswith("linux")
        and libc is not None
        and TUNABLES_VAR not in environ
        and environ.get(OPT_OUT_VAR, "") not in ("1", "true", "yes")
        and DONE_VAR not in environ
        and bool(sys.executable)
    )


def tuned_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment of the re-executed process: everything as it was, plus the tunables."""
    return {**environ, TUNABLES_VAR: TUNABLES, DONE_VAR: "1"}


def reexec_command(orig_argv: Sequence[str]) -> list[str]:
    """The same interpreter with the same options, script or `-m` module and arguments."""
    return [sys.executable, *orig_argv[1:]]


def default_wait_policy(environ: MutableMapping[str, str]) -> None:
    """OMP_WAIT_POLICY=PASSIVE in `environ`, unless one of WAIT_VARS is already set."""
    if not any(var in environ for var in WAIT_VARS):
        environ.update(WAIT_DEFAULT)


def reexec_with_malloc_tuning(environ: MutableMapping[str, str] | None = None) -> None:
    """Set OpenMP's wait default (`default_wait_policy`), then replace this process by itself with
    GLIBC_TUNABLES set; returns only when nothing is to be done."""
    environ = os.environ if environ is None else environ
    default_wait_policy(environ)  # also without the re-exec: torch is not loaded yet
    if not should_reexec(environ):
        return
    argv = getattr(sys, "orig_argv", None)
    if not argv:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, reexec_command(argv), tuned_environment(environ))
