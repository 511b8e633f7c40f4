"""`data.pipeline=auto`: the backend measured fastest on *this* machine, or measured now.

Which backend wins depends on the CPU (its vector extensions, how many cores the process
may use) and on the GPU, so the measurements are keyed by a machine key built from those
(`machine_key`). Two tables are consulted, both in the same JSON shape:

1. the table shipped beside this file (`auto_backend.json`), written by
   `python -m rrd_fast.bench pipelines --write-auto-table` on the machines we measured;
2. the user's cache (`$XDG_CACHE_HOME/rrd-fast/auto_backend.json`, else
   `~/.cache/rrd-fast/auto_backend.json`), written by the probe below.

When neither has a row for this machine, data kind and device type, a short probe times a
few batches of each installed backend on the run's own data and stores the winner in the
cache, so it runs once per machine. Processes starting together (one per rank) take a file
lock around the probe: one measures, the others read its result.

This module builds no pipeline itself: the caller hands the probe a factory, which keeps
this module free of the backends it compares.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import itertools
import json
import logging
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from pipelines.errors import DataError

log = logging.getLogger("pipelines.backends")

TABLE_FORMAT = "rrd-fast-auto-backend/2"
SHIPPED_TABLE = Path(__file__).with_name("auto_backend.json")
CACHE_FILE = Path("rrd-fast") / "auto_backend.json"
TABLE_COMMENT = ("Rows keyed by machine (see pipelines/auto.py machine_key). Written by "
                 "`python -m rrd_fast.bench pipelines --write-auto-table` (shipped table) or by the first-use probe "
                 "(user cache); read by data.pipeline=auto.")

# CPU features that move the torch/DALI balance: the vector widths their kernels use, and
# native bf16/fp16 arithmetic (half-precision batches). Other flags do not enter the key,
# so that two machines of one model and size share a row.
KEY_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16", "amx_tile", "asimd", "sve")

# Probe size: enough to pass DALI's pipeline start-up and see a steady rate, small enough
# to stay within a few seconds on a 2-core machine. Batches hold REFERENCE_BATCH images,
# the batch the shipped table is measured at, so that a stored row does not depend on the
# batch size of the run that happened to come first; a split smaller than that is probed at
# the run's batch size for this run only, and nothing is stored.
PROBE_BATCHES = 4
PROBE_ROUNDS = 2
PROBE_BUDGET_S = 1.5  # per backend and round
REFERENCE_BATCH = 256


# ---------------------------------------------------------------------------------------
# the machine
# ---------------------------------------------------------------------------------------

def _cpuinfo() -> dict[str, str]:
    """The first processor block of /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info.setdefault(key.strip().lower(), value.strip())
    return info


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask): what a VM or a job scheduler grants."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def machine_description(device: str | torch.device = "cpu") -> dict[str, Any]:
    """CPU model, architecture, usable cores, the key flags present, and the GPU for a CUDA device."""
    info = _cpuinfo()
    model = info.get("model name") or info.get("hardware") or info.get("cpu model") or platform.processor()
    flags = set((info.get("flags") or info.get("features") or "").split())
    device = torch.device(device)
    gpu = None
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device) if torch.cuda.is_available() else "no CUDA device"
    return {
        "arch": platform.machine(),
        "cpu": " ".join((model or "unknown CPU").split()),
        "cores": usable_cores(),
        "flags": [f for f in KEY_FLAGS if f in flags],
        "gpu": gpu,
    }


def machine_key(description: dict[str, Any]) -> str:
    """'x86_64 | AMD EPYC 7B13 | 2 cores | avx2 avx512f' (+ ' | NVIDIA H200' for CUDA devices)."""
    parts = [description["arch"], description["cpu"], f"{description['cores']} cores",
             " ".join(description["flags"]) or "no key flags"]
    if description.get("gpu"):
        parts.append(description["gpu"])
    return " | ".join(parts)


def entry_key(kind: str, device: str | torch.device) -> str:
    """Row of a dataset kind on a device type within a machine, e.g. `array/cpu`, `files/cuda`."""
    return f"{kind}/{torch.device(device).type}"


# ---------------------------------------------------------------------------------------
# the tables
# ---------------------------------------------------------------------------------------

def cache_path() -> Path:
    """The user's table: $XDG_CACHE_HOME/rrd-fast/auto_backend.json, else ~/.cache/rrd-fast/auto_backend.json."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / CACHE_FILE


def empty_table() -> dict[str, Any]:
    return {"format": TABLE_FORMAT, "comment": TABLE_COMMENT, "machines": {}}


def load_table(path: str | Path) -> dict[str, Any]:
    """A machine-keyed table (an empty one if the file does not exist); a malformed file is a DataError.

    A table without a `machines` mapping (the earlier, unkeyed layout) has rows that cannot
    be matched to a machine, so it reads as empty and a warning says so.
    """
    path = Path(path)
    if not path.is_file():
        return empty_table()
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable backend table ({' '.join(str(exc).split())})") from None
    if not isinstance(table, dict):
        raise DataError(f"{path}: backend table must be a JSON object with a 'machines' mapping")
    if "machines" not in table:
        log.warning("%s: backend table has no 'machines' mapping (rows not keyed by machine); ignoring its rows", path)
        return empty_table()
    machines = table["machines"]
    if not isinstance(machines, dict) or not all(isinstance(m, dict) and isinstance(m.get("entries", {}), dict)
                                                 for m in machines.values()):
        raise DataError(f"{path}: 'machines' must map machine keys to objects with an 'entries' mapping")
    return table


def lookup(table: dict[str, Any], machine: str, key: str) -> dict[str, Any] | None:
    entry = table.get("machines", {}).get(machine, {}).get("entries", {}).get(key)
    return entry if isinstance(entry, dict) else None


def merge_entries(table: dict[str, Any], description: dict[str, Any], entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Add or replace this machine's rows (other machines and other rows of this one are kept)."""
    table.setdefault("format", TABLE_FORMAT)
    table.setdefault("comment", TABLE_COMMENT)
    row = table.setdefault("machines", {}).setdefault(machine_key(description), {})
    row["machine"] = description
    row.setdefault("entries", {}).update(entries)
    return table


def save_table(path: str | Path, table: dict[str, Any]) -> None:
    """Atomic write with sorted keys, so a rerun diffs cleanly and a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(table, f, indent=2, sort_keys=True)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a table is not
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Exclusive lock on the cache folder itself while one process probes (no lock file is left behind)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------
# the probe
# ---------------------------------------------------------------------------------------

PipelineFactory = Callable[[str], Any]  # backend name -> a Pipeline over the probe's samples


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _endless(pipe: Any) -> Iterator[Any]:
    """The pipeline's batches, epoch after epoch (a small probe split ends its epochs quickly)."""
    for epoch in itertools.count():
        yield from pipe.epoch(epoch)


def probe(make: PipelineFactory, backends: list[str], device: str | torch.device,
          batches: int = PROBE_BATCHES, rounds: int = PROBE_ROUNDS, budget_s: float = PROBE_BUDGET_S) -> dict[str, float]:
    """img/s of each backend: its best of `rounds` interleaved runs of up to `batches` batches.

    Each backend's pipeline is built once and warmed up (a DALI lane builds its pipeline on
    its first batch) before anything is timed. A backend that fails is left out, with a
    warning; the caller decides what an empty result means.
    """
    device = torch.device(device)
    streams: dict[str, Iterator[Any]] = {}
    pipes: dict[str, Any] = {}
    rates: dict[str, float] = {}
    try:
        for name in backends:
            try:
                pipe = make(name)
                stream = _endless(pipe)
                for _ in range(max(1, int(getattr(pipe, "lanes", 1)))):
                    next(stream)
            except Exception as exc:  # noqa: BLE001 - a broken backend must not stop the run here
                log.warning("data.pipeline=auto: probing %s failed (%s: %s); leaving it out", name,
                            type(exc).__name__, " ".join(str(exc).split())[:300])
                continue
            pipes[name], streams[name] = pipe, stream
        for _ in range(rounds):
            for name, stream in list(streams.items()):
                _sync(device)
                start, seen = time.perf_counter(), 0
                try:
                    for _ in range(batches):
                        seen += len(next(stream))
                        if time.perf_counter() - start >= budget_s:
                            break
                except Exception as exc:  # noqa: BLE001
                    log.warning("data.pipeline=auto: probing %s failed (%s: %s); leaving it out", name,
                                type(exc).__name__, " ".join(str(exc).split())[:300])
                    del streams[name]
                    rates.pop(name, None)
                    continue
                _sync(device)
                rates[name] = max(rates.get(name, 0.0), seen / (time.perf_counter() - start))
    finally:
        for built in pipes.values():
            close = getattr(built, "close", None)
            if close is not None:
                close()
        # DALI pipelines sit in reference cycles, so only the cycle collector frees them. Free
        # them now, while their worker threads exist: a forked child (a DataLoader worker) that
        # collected them later would wait forever in DALI's destructor for threads it lacks.
        pipe = stream = built = None
        pipes.clear()
        streams.clear()
        gc.collect()
    return rates


def choose(kind: str, device: str | torch.device, candidates: list[str], fallback: str,
           shipped: str | Path = SHIPPED_TABLE, make: PipelineFactory | None = None,
           what: str = "", store: bool = True) -> tuple[str, str]:
    """(backend, reason) for `kind` data on `device`: a table row for this machine, else a probe, else `fallback`.

    `candidates` are the installed backends; `make` builds the probe's pipelines (no probe
    without it); `store=False` keeps a probe's result out of the cache (a probe at another
    batch than REFERENCE_BATCH). `what` names the data in the log lines.
    """
    if len(candidates) < 2:
        return candidates[0] if candidates else fallback, f"only {candidates[0] if candidates else fallback} is installed"
    description = machine_description(device)
    machine = machine_key(description)
    key = entry_key(kind, device)
    shipped = Path(shipped)
    cache = cache_path()
    for path, table in ((shipped, load_table(shipped)), (cache, _load_cache(cache))):
        entry = lookup(table, machine, key)
        if entry is not None and entry.get("backend") in candidates:
            return entry["backend"], _reason(entry, path)
    if make is None:
        return fallback, f"no measurement for {key} on {machine!r} in {shipped.name} or {cache}, no data to probe; fallback"
    with _locked(cache.parent):
        entry = lookup(_load_cache(cache), machine, key)  # another process may have probed meanwhile
        if entry is not None and entry.get("backend") in candidates:
            return entry["backend"], _reason(entry, cache)
        log.info("data.pipeline=auto: no measurement for %s on %r; probing %s on %s (a few seconds)", key, machine,
                 ", ".join(candidates), what or f"{kind} data")
        t0 = time.perf_counter()
        rates = probe(make, candidates, device)
        if not rates:
            return fallback, f"the probe of {', '.join(candidates)} failed; fallback"
        entry = {"backend": max(rates, key=rates.get), "img_s": {k: round(v) for k, v in rates.items()},
                 "measured": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "source": "probe",
                 "note": f"first-use probe on {what or kind + ' data'}, {time.perf_counter() - t0:.2f} s"}
        figures = _figures(entry)
        if len(rates) < len(candidates):  # a backend failed: choose among the rest, but do not remember it
            return entry["backend"], f"probed now: {figures}; not stored (a backend failed)"
        if not store:
            return entry["backend"], (f"probed now: {figures}; not stored (fewer samples than the reference batch of "
                                      f"{REFERENCE_BATCH})")
        save_table(cache, merge_entries(_load_cache(cache), description, {key: entry}))
        return entry["backend"], f"probed now: {figures}; stored in {cache}"


def _load_cache(path: Path) -> dict[str, Any]:
    """The user's cache; a damaged one is only a cache, so it reads as empty (and is rewritten by the next probe)."""
    try:
        return load_table(path)
    except DataError as exc:
        log.warning("%s; ignoring the cached measurements", exc)
        return empty_table()


def _figures(entry: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:,.0f} img/s" for k, v in sorted(entry.get("img_s", {}).items()))


def _reason(entry: dict[str, Any], path: Path) -> str:
    how = "probed" if entry.get("source") == "probe" else "measured"
    return f"{how} on this machine ({path}, {entry.get('measured', 'undated')}): {_figures(entry)}"
