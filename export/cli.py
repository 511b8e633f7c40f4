"""Command-line plumbing shared by `python -m export` and `python -m export.bench`.

Bad input (a missing checkpoint, an unknown backend, a corrupted artifact, a bad flag)
becomes one line on stderr and exit code 2, as in the trainer's CLI.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn

from export.errors import ExportError
from pipelines.errors import DataError
from rrd_fast.checkpoint import CheckpointError
from rrd_fast.cli import run_cli as run_with_errors
from rrd_fast.models import UnknownModelError

USER_ERRORS: tuple[type[Exception], ...] = (ExportError, DataError, CheckpointError, UnknownModelError)


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; we print one line that names the option."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {' '.join(message.split())} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def run_cli(main: Callable[[], int]) -> int:
    """The trainer's one-line error handling, for the errors of export and its inputs."""
    return run_with_errors(main, USER_ERRORS)
