"""The project's one root for user-facing errors, the data side's own kind, and the "did you mean" hint.

Every error that means "fix your input" (a config key, a model name, a file, a flag)
subclasses `UserError`, so each command line catches that one type and prints its
one-line message; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class UserError(ValueError):
    """Bad input from the user. The message is one line that names the file, key or option to fix."""


class DataError(UserError):
    """Bad or missing data. The message is one line that names the file or field."""


def did_you_mean(name: str, known: Iterable[str], prefix: str = "") -> str:
    """`; did you mean '<prefix><closest>'?` for an unknown name, or "" when nothing is close."""
    close = difflib.get_close_matches(str(name), list(known), n=1)
    return f"; did you mean '{prefix}{close[0]}'?" if close else ""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, or its type when the message is empty, cut to `limit`."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:limit]
