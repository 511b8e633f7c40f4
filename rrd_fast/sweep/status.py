"""Each run's outcome in the sweep folder, `status/<run>.json`, written by whichever process ran it."""

from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path
from typing import Any

from pipelines.errors import UserError
from rrd_fast.atomic import write_json_atomic

STATUS_DIR = "status"


def status_path(sweep_dir: Path, name: str) -> Path:
    return sweep_dir / STATUS_DIR / f"{name}.json"


def read_status(sweep_dir: Path, name: str) -> dict[str, Any] | None:
    path = status_path(sweep_dir, name)
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return None


def write_status(sweep_dir: Path, name: str, result: dict[str, Any]) -> None:
    write_json_atomic(status_path(sweep_dir, name), result)


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if isinstance(exc, UserError) else f"{type(exc).__name__}: {text}"


def record_failure(result: dict[str, Any], exc: BaseException) -> None:
    """Mark a job failed with its one-line error; anything but a user error also prints its traceback."""
    result.update(status="failed", error=one_line(exc))
    if not isinstance(exc, UserError):
        traceback.print_exc()


def finish_status(sweep_dir: Path, name: str, result: dict[str, Any], started: float) -> dict[str, Any]:
    """Add the job's seconds (since `started`, a perf_counter reading) and CPUs, write its status, return it."""
    result["seconds"] = time.perf_counter() - started
    if hasattr(os, "sched_getaffinity"):
        result["cpus"] = sorted(os.sched_getaffinity(0))
    write_status(sweep_dir, name, result)
    return result
