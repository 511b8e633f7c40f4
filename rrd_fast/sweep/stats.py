"""Statistics over a cell's seeds, shared by the results table and the transfer table."""

from __future__ import annotations

import math
import statistics
from typing import Any


def stats(values: list[float]) -> dict[str, Any]:
    """mean and sample std (ddof=1; None with fewer than two values) of the seeds' values."""
    return {"mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None, "values": values}


def pooled_std(a: dict[str, Any], na: int, b: dict[str, Any], nb: int) -> float | None:
    if na < 2 or nb < 2 or a["std"] is None or b["std"] is None:
        return None
    return math.sqrt(((na - 1) * a["std"] ** 2 + (nb - 1) * b["std"] ** 2) / (na + nb - 2))


def number_text(value: float | None, sign: bool = False) -> str:
    """Two decimals (signed with `sign`); a dash for a missing or NaN value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:+.2f}" if sign else f"{value:.2f}"


def mean_std_text(block: dict[str, Any], n: int, always_n: bool = False) -> str:
    """"mean ± std" of a cell of n seeds ("mean (n=1)" for one seed; `always_n` appends n in every case)."""
    if not n:
        return "—"
    if n == 1 or block["std"] is None:  # no spread: say it rests on one value
        return f"{number_text(block['mean'])} (n={n if always_n else 1})"
    text = f"{number_text(block['mean'])} ± {number_text(block['std'])}"
    return f"{text} (n={n})" if always_n else text
