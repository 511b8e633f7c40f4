"""Command-line error handling: bad input becomes one line on stderr and exit code 2."""

from __future__ import annotations

import sys
from typing import Callable

from pipelines.errors import DataError
from rrd_fast.checkpoint import CheckpointError
from rrd_fast.config import ConfigError
from rrd_fast.methods.base import MethodError
from rrd_fast.models import UnknownModelError


class RunError(RuntimeError):
    """A run that cannot continue (non-finite loss, mismatched resume state, ...)."""


USER_ERRORS: tuple[type[Exception], ...] = (DataError, CheckpointError, ConfigError, MethodError, UnknownModelError, RunError)


def run_cli(main: Callable[[], int], errors: tuple[type[Exception], ...] = USER_ERRORS) -> int:
    """Run `main`; an exception in `errors` becomes one `error: ...` line on stderr and exit code 2."""
    try:
        return main()
    except errors as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
