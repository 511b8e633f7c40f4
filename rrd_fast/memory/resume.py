"""Resume state of memories split across processes: one file per rank, re-split on load.

Saving never gathers: each rank writes the rows it holds to its own safetensors file,
tagged with the global row range, so no rank ever holds a whole sharded memory, not even
at save time. Loading with any number of processes, each rank reads only the row ranges
it now owns, through safetensors' lazy slices of every old file that overlaps them.

Files are named by a tag (the global step) that the main resume file records; they are
written before it and stale ones are removed only after it has been replaced, so a crash
mid-save leaves the previous, consistent state in place. The run folder must be on a
filesystem that every rank can read and write. A missing, truncated or garbage shard, or
one whose row records are malformed, is a one-line `ResumeShardError` naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from rrd_fast.atomic import atomic_path
from rrd_fast.checkpoint import CheckpointError
from rrd_fast.cli import RunError
from rrd_fast.memory.base import Memory, RowShard

MEMORY_DIR = Path("resume") / "memory"


class ResumeShardError(RunError, CheckpointError):
    """A memory shard of the resume state that is missing, unreadable or does not fit this run."""


def memory_shards(root: nn.Module) -> dict[str, tuple[nn.Module, str, RowShard]]:
    """State-dict key -> (module, buffer name, shard) for every memory buffer under `root`."""
    found: dict[str, tuple[nn.Module, str, RowShard]] = {}
    for prefix, module in root.named_modules():
        if isinstance(module, Memory):
            for name, shard in module.row_shards().items():
                found[f"{prefix}.{name}" if prefix else name] = (module, name, shard)
    return found


def shard_file(run_dir: Path, tag: str, rank: int) -> Path:
    return Path(run_dir) / MEMORY_DIR / f"{tag}-rank{rank:05d}.safetensors"


def write_rank_shards(run_dir: Path, tag: str, root: nn.Module, rank: int, world_size: int) -> Path:
    """Write this rank's memory rows (replicated rows only from rank 0) atomically; every rank writes a file."""
    tensors: dict[str, torch.Tensor] = {}
    rows: dict[str, list[int]] = {}
    for key, (module, name, shard) in memory_shards(root).items():
        if shard.replicated and rank != 0:
            continue
        tensors[key] = getattr(module, name).detach().to("cpu").contiguous()
        rows[key] = [shard.start, shard.stop, shard.total, int(shard.per_rank)]
    path = shard_file(run_dir, tag, rank)
    meta = {"rows": json.dumps(rows), "rank": str(rank), "world_size": str(world_size), "tag": tag}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def remove_stale_shards(run_dir: Path, keep: str) -> None:
    for path in (Path(run_dir) / MEMORY_DIR).glob("*.safetensors"):
        if not path.name.startswith(f"{keep}-rank"):
            path.unlink(missing_ok=True)


def load_rank_shards(run_dir: Path, tag: str, saved_world: int, root: nn.Module, rank: int, world_size: int) -> None:
    """Fill every memory buffer under `root` with the rows this rank owns now, from the files of `saved_world` ranks."""
    shards = memory_shards(root)
    if not shards:
        return
    files = [shard_file(run_dir, tag, r) for r in range(saved_world)]
    for path in files:
        if not path.is_file():
            raise ResumeShardError(f"{path}: memory shard of the resume state is missing (saved by {saved_world} processes)")
    handles = [_open_shard(path) for path in files]
    layouts = []
    for path, handle in zip(files, handles):
        meta = handle.metadata() or {}
        if meta.get("tag") != tag:
            raise ResumeShardError(f"{path}: memory shard belongs to save {meta.get('tag')!r}, expected {tag!r}")
        layouts.append(_row_layout(path, meta.get("rows", "{}"), set(handle.keys())))
    for key, (module, name, shard) in shards.items():
        buffer = getattr(module, name)
        if shard.per_rank:
            if saved_world != world_size:
                raise ResumeShardError(
                    f"{files[0].parent}: {key} is one memory per process (distributed.memory_sharding=local), "
                    f"saved by {saved_world} processes; resume it with {saved_world}, not {world_size}")
            loaded = _read_rows(key, files[rank], handles[rank], layouts[rank], shard.total, 0, shard.total)
        else:
            loaded = _assemble(key, files, handles, layouts, shard)
        if tuple(loaded.shape) != tuple(buffer.shape):
            raise ResumeShardError(f"{files[0].parent}: {key} has shape {tuple(loaded.shape)}, this run expects {tuple(buffer.shape)}")
        with torch.no_grad():
            buffer.copy_(loaded)


def _open_shard(path: Path) -> Any:
    """safe_open with its errors (truncated file, garbage header) as one line naming the file."""
    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for unreadable files
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ResumeShardError(f"{path}: memory shard of the resume state is not a readable safetensors file "
                               f"({reason}); resume from an intact run folder") from None


def _row_layout(path: Path, text: str, tensors: set[str]) -> dict[str, tuple[int, int, int, int]]:
    """The shard's `rows` metadata, {key: (start, stop, total, per_rank)}, checked before any row is read."""
    try:
        rows = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        rows = None
    if not isinstance(rows, dict):
        raise ResumeShardError(f"{path}: memory shard metadata 'rows' is not a JSON object")
    layout = {}
    for key, value in rows.items():
        ok = (isinstance(value, list) and len(value) == 4
              and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
              and value[0] <= value[1] <= value[2])
        if not ok or key not in tensors:
            raise ResumeShardError(f"{path}: memory shard metadata 'rows.{key}' is {value!r}, expected "
                                   "[start, stop, total, per_rank] of a tensor in the file")
        layout[key] = (value[0], value[1], value[2], value[3])
    return layout


def _read_rows(key: str, path: Path, handle, layout: dict, total: int, lo: int, hi: int) -> torch.Tensor:
    if key not in layout:
        raise ResumeShardError(f"{path}: no {key} in this memory shard")
    start, stop, saved_total, _ = layout[key]
    if saved_total != total:
        raise ResumeShardError(f"{path}: {key} has {saved_total} rows in the resume state, this run has {total}")
    try:
        rows = handle.get_slice(key)[lo - start : hi - start]
    except Exception as exc:  # noqa: BLE001 - safetensors' own error types for a bad data region
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ResumeShardError(f"{path}: cannot read {key} from this memory shard ({reason})") from None
    if rows.shape[0] != hi - lo:
        raise ResumeShardError(f"{path}: {key} holds {rows.shape[0]} rows where its metadata promises {hi - lo}")
    return rows


def _assemble(key: str, files: list[Path], handles: list, layouts: list[dict], shard: RowShard) -> torch.Tensor:
    """Rows [shard.start, shard.stop) from whichever saved files hold them."""
    need = shard.stop - shard.start
    out: torch.Tensor | None = None
    covered = torch.zeros(need, dtype=torch.bool)
    for path, handle, layout in zip(files, handles, layouts):
        if key not in layout:
            continue
        start, stop, total, per_rank = layout[key]
        if per_rank and len(files) > 1:
            raise ResumeShardError(f"{path}: {key} was saved as one memory per process (memory_sharding=local) "
                                  "and cannot be re-split; resume with the same sharding and process count")
        lo, hi = max(start, shard.start), min(stop, shard.stop)
        if lo >= hi:
            continue
        rows = _read_rows(key, path, handle, layout, shard.total, lo, hi)
        if out is None:
            out = torch.empty((need, *rows.shape[1:]), dtype=rows.dtype)
        out[lo - shard.start : hi - shard.start] = rows
        covered[lo - shard.start : hi - shard.start] = True
    if out is None or not bool(covered.all()):
        raise ResumeShardError(f"{files[0].parent}: the resume state does not hold rows {shard.start}..{shard.stop - 1} of {key}")
    return out
