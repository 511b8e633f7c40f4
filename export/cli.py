"""Command-line plumbing shared by `python -m export` and `python -m export.bench`.

Bad input (a missing checkpoint, an unknown backend, a corrupted artifact, a bad flag)
becomes one line on stderr and exit code 2, as in the trainer's CLI: every such error is a
`UserError`, which the trainer's `run_cli` catches.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from rrd_fast.cli import run_cli

__all__ = ["OneLineParser", "run_cli"]


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; we print one line that names the option."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {' '.join(message.split())} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)
