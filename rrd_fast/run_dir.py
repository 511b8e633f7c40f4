"""Run folders that are never overwritten by accident and never written by two runs at once.

A fresh run refuses a folder that already holds a run (it says how to continue, rename or
replace it); `--overwrite` replaces it explicitly. While a run writes its folder it holds
`.lock`, naming its pid and host; a second run refuses, and a lock left by a dead process on
this host is taken over. Temporary files a killed write left behind are removed at start.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

from rrd_fast.cli import RunError

LOCK_NAME = ".lock"
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "model.safetensors", "resume")


def holds_a_run(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in RUN_MARKERS)


def check_fresh(path: Path, overwrite: bool) -> None:
    """Refuse to start a new run over an existing one unless `overwrite`; read-only, safe on every rank."""
    if path.exists() and not path.is_dir():
        raise RunError(f"{path}: the run folder is a file; choose another name= or output_dir=")
    if holds_a_run(path) and not overwrite:
        raise RunError(f"{path}: a run already exists here; continue it with `--resume {path}`, "
                       "start another with a new name=..., or replace it with --overwrite")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive lock file in the run folder, released by `release()` (or at process exit by the OS
    in effect: a lock whose pid is dead is stale and taken over)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_NAME
        self.held = False

    def acquire(self) -> "RunLock":
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                pid = holder.get("pid")
                if holder.get("host") == me["host"] and isinstance(pid, int) and (pid == me["pid"] or not _alive(pid)):
                    self.path.unlink(missing_ok=True)  # stale (its process is gone) or this process's own
                    continue
                raise RunError(f"{self.path.parent}: another run is writing this folder (pid {holder.get('pid', '?')} "
                               f"on {holder.get('host', '?')}, since {holder.get('since', '?')}); wait for it, or remove "
                               f"{self.path} if that process is gone") from None
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            self.held = True
            return self
        raise RunError(f"{self.path}: could not take the run lock")

    def _holder(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def remove_temp_files(folder: Path) -> list[Path]:
    """Delete `.NAME.*.tmp` files that a write killed midway left (atomic_path's temporaries)."""
    removed = []
    if folder.is_dir():
        for tmp in folder.rglob(".*.tmp"):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


def open_run_dir(path: Path, resume: bool, overwrite: bool) -> RunLock:
    """Lock the run folder (creating or, with `overwrite`, emptying it) and clear stale temporaries."""
    if not resume:
        check_fresh(path, overwrite)
    if path.exists() and not path.is_dir():
        raise RunError(f"{path}: the run folder is a file")
    path.mkdir(parents=True, exist_ok=True)
    lock = RunLock(path).acquire()
    if overwrite and not resume:
        for child in path.iterdir():
            if child.name != LOCK_NAME:
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    remove_temp_files(path)
    return lock
