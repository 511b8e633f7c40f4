"""Each run's outcome in the sweep folder, `status/<run>.json`, written by whichever process ran it."""

from __future__ import annotations

import json
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
