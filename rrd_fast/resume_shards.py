"""Resume state of memories split across processes: one file per rank, re-split on load.

Saving never gathers: each rank writes the rows it holds to its own safetensors file,
tagged with the global row range, so no rank ever holds a whole sharded memory, not even
at save time. Loading with any number of processes, each rank reads only the row ranges
it now owns, through safetensors' lazy slices of every old file that overlaps them.

Files are named by a tag (the global step) that the main resume file records; they are
written before it and stale ones are removed only after it has been replaced, so a crash
mid-save leaves the previous, consistent state in place. The run folder must be on a
filesystem that every rank can read and write.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from rrd_fast.atomic import atomic_path
from rrd_fast.checkpoint import CheckpointError
from rrd_fast.memory import Memory, RowShard

MEMORY_DIR = Path("resume") / "memory"


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
            raise CheckpointError(f"{path}: memory shard of the resume state is missing (saved by {saved_world} processes)")
    handles = [safe_open(str(path), framework="pt") for path in files]
    layouts = []
    for path, handle in zip(files, handles):
        meta = handle.metadata() or {}
        if meta.get("tag") != tag:
            raise CheckpointError(f"{path}: memory shard belongs to save {meta.get('tag')!r}, expected {tag!r}")
        layouts.append({k: tuple(v) for k, v in json.loads(meta.get("rows", "{}")).items()})
    for key, (module, name, shard) in shards.items():
        buffer = getattr(module, name)
        if shard.per_rank:
            if saved_world != world_size:
                raise CheckpointError(
                    f"{files[0].parent}: {key} is one memory per process (distributed.memory_sharding=local), "
                    f"saved by {saved_world} processes; resume it with {saved_world}, not {world_size}")
            loaded = _read_rows(key, files[rank], handles[rank], layouts[rank], shard.total, 0, shard.total)
        else:
            loaded = _assemble(key, files, handles, layouts, shard)
        if tuple(loaded.shape) != tuple(buffer.shape):
            raise CheckpointError(f"{files[0].parent}: {key} has shape {tuple(loaded.shape)}, this run expects {tuple(buffer.shape)}")
        with torch.no_grad():
            buffer.copy_(loaded)


def _read_rows(key: str, path: Path, handle, layout: dict, total: int, lo: int, hi: int) -> torch.Tensor:
    if key not in layout:
        raise CheckpointError(f"{path}: no {key} in this memory shard")
    start, stop, saved_total, _ = layout[key]
    if saved_total != total:
        raise CheckpointError(f"{path}: {key} has {saved_total} rows in the resume state, this run has {total}")
    return handle.get_slice(key)[lo - start : hi - start]


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
            raise CheckpointError(f"{path}: {key} was saved as one memory per process (memory_sharding=local) "
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
        raise CheckpointError(f"{files[0].parent}: the resume state does not hold rows {shard.start}..{shard.stop - 1} of {key}")
    return out
