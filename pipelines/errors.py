"""The one exception type the data side raises for bad input, and the shared "did you mean" hint."""

from __future__ import annotations

import difflib
from typing import Iterable


class DataError(ValueError):
    """Bad or missing data. The message is one line that names the file or field."""


def did_you_mean(name: str, known: Iterable[str], prefix: str = "") -> str:
    """`; did you mean '<prefix><closest>'?` for an unknown name, or "" when nothing is close."""
    close = difflib.get_close_matches(str(name), list(known), n=1)
    return f"; did you mean '{prefix}{close[0]}'?" if close else ""
