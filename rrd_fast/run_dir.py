"""Run folders that are never overwritten by accident and never written by two runs at once.

A fresh run refuses a folder that already holds a run (it says how to continue, rename or
replace it); `--overwrite` replaces it explicitly. While a run writes its folder it holds
`.lock`, naming its pid and host; a second run refuses, and a lock left by a dead process on
this host is taken over. Temporary files a killed write left behind are removed at start.
A folder that cannot be written (read-only, no permission, a file in the way) is refused
before anything runs, and a disk that fills up during a checkpoint gets one line saying
which checkpoint survived.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from rrd_fast.atomic import DISK_FULL_ERRNOS
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


def check_resumable(path: Path) -> None:
    """Refuse a `--resume` target that is not a run folder, before its config is read."""
    if path.exists() and not path.is_dir():
        raise RunError(f"{path}: the run folder is a file; --resume takes the folder of a run")
    if not path.exists():
        raise RunError(f"{path}: no such run folder to resume")


READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


def check_writable(path: Path) -> None:
    """Refuse a run folder that cannot be written, by writing and removing a probe file.

    Probes the folder or, if it does not exist yet, the nearest folder above it (mkdir makes the
    rest). os.access cannot answer: it ignores read-only mounts and answers yes for root.
    """
    folder = path
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    if not folder.is_dir():
        where = "the run folder is a file" if folder == path else f"a file where a folder of {path} must be"
        raise RunError(f"{folder}: {where}; choose another name= or output_dir=")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", suffix=".tmp", dir=folder)
        try:
            os.write(fd, b"probe")
        finally:
            os.close(fd)
            Path(probe).unlink(missing_ok=True)
    except OSError as exc:
        if exc.errno in READ_ONLY_ERRNOS:
            raise RunError(f"{folder}: cannot write the run folder here ({os.strerror(exc.errno)}); make it writable "
                           "or choose another output_dir=") from None
        if exc.errno in DISK_FULL_ERRNOS:
            raise RunError(f"{folder}: disk full ({os.strerror(exc.errno)}); free space or choose another "
                           "output_dir=") from None
        raise


def last_checkpoint(state_file: Path) -> tuple[int, int] | None:
    """(epoch, global step) of the resume state in `state_file`: the epoch is 1-based, the one the
    state ends or stopped in; None when there is no readable one."""
    import torch

    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True, mmap=True)
        epoch, step_in_epoch, step = int(state["epoch"]), int(state.get("step_in_epoch", 0)), int(state["global_step"])
    except Exception:  # missing, unreadable or foreign: there is no checkpoint to point at
        return None
    return epoch + (1 if step_in_epoch else 0), step


def disk_full_message(path: Path, run_dir: Path, state_file: Path) -> str:
    """The one line for a disk that filled up while `path` of the run in `run_dir` (resume state
    `state_file`) was being written."""
    last = last_checkpoint(state_file)
    if last is None:
        return (f"{path}: disk full while writing the checkpoint; no checkpoint of this run is complete yet; free "
                f"space and start it again with --overwrite")
    return (f"{path}: disk full while writing the checkpoint; the last complete checkpoint (epoch {last[0]}, step "
            f"{last[1]}) is intact; free space and resume with: python rrd_fast/train.py --resume {run_dir}")


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
    check_writable(path)
    path.mkdir(parents=True, exist_ok=True)
    lock = RunLock(path).acquire()
    if overwrite and not resume:
        for child in path.iterdir():
            if child.name != LOCK_NAME:
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    remove_temp_files(path)
    return lock
