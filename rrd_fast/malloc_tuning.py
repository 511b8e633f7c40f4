"""Restart the current process once with glibc malloc tuned for training.

glibc serves large blocks (activations, gradients) with mmap and returns them with
munmap, so every step re-faults the same hundreds of megabytes; raising the mmap and
trim thresholds keeps them in the heap, which speeds up CPU training markedly. The
setting is read only when a process starts, hence the re-exec.
The process keeps its PID, argv, working directory and environment (launcher and
torch.distributed variables included), so it is safe under `accelerate launch`.

This module must not import torch: it runs before the heavy imports.
"""

from __future__ import annotations

import os
import sys
from typing import Mapping, MutableMapping, Sequence

TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184"
TUNABLES_VAR = "GLIBC_TUNABLES"
OPT_OUT_VAR = "RRD_FAST_NO_MALLOC_TUNING"
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


def reexec_with_malloc_tuning(environ: MutableMapping[str, str] | None = None) -> None:
    """Replace this process by itself with GLIBC_TUNABLES set; returns only when nothing is to be done."""
    environ = os.environ if environ is None else environ
    if not should_reexec(environ):
        return
    argv = getattr(sys, "orig_argv", None)
    if not argv:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, reexec_command(argv), tuned_environment(environ))
