"""Atomic file writes (a reader sees the old file or the complete new one, never a partial one),
and the strict read of the JSON files written that way.

A write that fails because the disk is full (ENOSPC), the user's quota is used up (EDQUOT) or
the file-size limit is reached (EFBIG, RLIMIT_FSIZE) raises `DiskFullError` naming the final
file; the temporary is removed and the previous file stays as it was.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from pipelines.errors import UserError

DISK_FULL_ERRNOS = frozenset(code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EFBIG) if code)
_PROBE_CHUNK, _PROBE_CHUNKS = 1 << 16, 16


class DiskFullError(UserError):
    """A write ran out of disk, quota or file-size limit; `path` is the file it was writing."""

    def __init__(self, path: Path, code: int) -> None:
        super().__init__(f"{path}: disk full while writing it ({os.strerror(code)})")
        self.path, self.errno = Path(path), code


def disk_full_errno(exc: BaseException, partial: Path) -> int | None:
    """The disk-full errno behind a failed write to `partial`, or None if the disk is not full.

    Writers in C++ or Rust (torch.save, safetensors) report a failed write without its errno,
    so then the file system is asked directly: appending up to 1 MiB to the partial file fails
    the same way when the disk, the quota or the size limit is what stopped the writer.
    """
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno if exc.errno in DISK_FULL_ERRNOS else None
    try:
        with open(partial, "ab", buffering=0) as fh:
            for _ in range(_PROBE_CHUNKS):
                fh.write(b"\0" * _PROBE_CHUNK)
    except OSError as probe:
        return probe.errno if probe.errno in DISK_FULL_ERRNOS else None
    return None


@contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the same folder; on success fsync it and rename over `final`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            raise DiskFullError(final, exc.errno) from None
        raise
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; give the final file ordinary permissions
        os.replace(tmp_path, final)
    except DiskFullError:
        raise
    except Exception as exc:
        code = disk_full_errno(exc, tmp_path)
        if code is None:
            raise
        raise DiskFullError(final, code) from exc
    finally:
        tmp_path.unlink(missing_ok=True)


def write_json_atomic(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json_object(path: Path, error: Callable[[str], Exception]) -> dict[str, Any]:
    """The JSON object in `path`; anything else raises `error` with one line naming the file."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid JSON ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data
