"""Command-line error handling: bad input becomes one line on stderr and exit code 2.

Every user-facing error subclasses `pipelines.errors.UserError`, so this module needs no
other part of the project and any command line (the trainer's, export's, the cache's) can
use it without importing the code that raises those errors.

It also keeps a process alive when the reader of its output is gone. `accelerate launch` (1.16
on) passes its worker's stderr through a pipe; once the launcher is killed, every write to that
pipe fails with EPIPE: the next progress-bar refresh would end the step loop before the stop
checkpoint, and the stop message would turn the worker's exit code 143 into Python's 1.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, TextIO

from pipelines.errors import UserError


class RunError(UserError, RuntimeError):
    """A run that cannot continue (non-finite loss, mismatched resume state, ...)."""


def run_cli(main: Callable[[], int]) -> int:
    """Run `main`; a `UserError` becomes one `error: ...` line on stderr and exit code 2."""
    try:
        return main()
    except UserError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


class _DropWhenUnread:
    """stdout/stderr that, once its pipe has no reader, points the descriptor at /dev/null and goes on."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._discard()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._discard()

    def _discard(self) -> None:
        """Later writes, and what the stream still buffers (flushed again at exit), now go to /dev/null."""
        try:
            fd = self._stream.fileno()
        except (OSError, ValueError):  # no descriptor behind it: the text is dropped all the same
            return
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, fd)
        finally:
            os.close(devnull)

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding, buffer, ...
        return getattr(self._stream, name)


def keep_going_without_readers() -> None:
    """For a process of its own (a command line's `__main__`): output nobody reads any more is dropped
    instead of raising BrokenPipeError wherever the next print or progress bar happens to be."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _DropWhenUnread):
            setattr(sys, name, _DropWhenUnread(stream))
