"""Command-line error handling: bad input becomes one line on stderr and exit code 2.

Every user-facing error subclasses `pipelines.errors.UserError`, so this module needs no
other part of the project and any command line (the trainer's, export's, the cache's) can
use it without importing the code that raises those errors.

Messages also survive a reader that is gone: `accelerate launch` (1.16 on) passes its worker's
stderr through a pipe, and once the launcher is killed every write to it fails with EPIPE. A
worker that has just checkpointed must still exit with its own code (143 after SIGTERM), not
with Python's 1 for the BrokenPipeError or 120 for the failed flush at exit.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, TextIO

from pipelines.errors import UserError


class RunError(UserError, RuntimeError):
    """A run that cannot continue (non-finite loss, mismatched resume state, ...)."""


def say(text: str, stream: TextIO | None = None) -> bool:
    """Write `text` as a line (stderr by default) and flush; False when no one reads it any more."""
    stream = sys.stderr if stream is None else stream
    try:
        print(text, file=stream, flush=True)
        return True
    except BrokenPipeError:
        _discard_output(stream)
        return False


def flush_std_streams() -> None:
    """Flush stdout and stderr now, so that a dead pipe cannot change the exit code at interpreter exit."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:
            _discard_output(stream)
        except (ValueError, AttributeError):  # closed or replaced by something without flush
            pass


def _discard_output(stream: TextIO) -> None:
    """Point the stream's descriptor at /dev/null: what it still buffers, and later writes, then succeed."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError, AttributeError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def run_cli(main: Callable[[], int]) -> int:
    """Run `main`; a `UserError` becomes one `error: ...` line on stderr and exit code 2."""
    try:
        code = main()
    except UserError as exc:
        say(f"error: {' '.join(str(exc).split())}")
        code = 2
    except KeyboardInterrupt:
        say("interrupted")
        code = 130
    flush_std_streams()
    return code
