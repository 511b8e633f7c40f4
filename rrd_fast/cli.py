"""Command-line error handling: bad input becomes one line on stderr and exit code 2.

Every user-facing error subclasses `pipelines.errors.UserError`, so this module needs no
other part of the project and any command line (the trainer's, export's, the cache's) can
use it without importing the code that raises those errors.
"""

from __future__ import annotations

import sys
from typing import Callable

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
