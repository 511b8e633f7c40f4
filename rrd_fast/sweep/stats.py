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
