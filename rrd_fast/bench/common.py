"""What every benchmark shares: the machine description, CIFAR-100's constants, the
per-sample DataLoader baseline, the malloc re-exec and JSON writing.

Importing this module must not import torch: `python -m rrd_fast.bench` calls
`tune_malloc_for` before the heavy imports, so that the re-executed process is the one
that pays for them.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any, Sequence

from pipelines.formats import get_format
from rrd_fast.atomic import write_json_atomic
from rrd_fast.malloc_tuning import TUNABLES_VAR, reexec_with_malloc_tuning

# The benchmarks time CIFAR-100-shaped work: 32x32 RGB images, 100 classes, its normalisation.
CIFAR100 = get_format("cifar100")
CIFAR_MEAN: tuple[float, ...] = tuple(CIFAR100.mean)
CIFAR_STD: tuple[float, ...] = tuple(CIFAR100.std)
NUM_CLASSES: int = CIFAR100.num_classes
CHANNELS: int = CIFAR100.channels
IMAGE_SIZE: int = CIFAR100.image_size

# Subcommands that time training-like work, so measure under the allocator settings training
# uses (rrd_fast/malloc_tuning.py). `memory` spawns its own processes; `probe` is started by
# `train` with exactly the settings it compares.
MALLOC_TUNED = frozenset({"train", "cache", "pipelines"})


def tune_malloc_for(argv: Sequence[str]) -> None:
    """Re-execute this process once with the glibc malloc tunables if `argv` names such a subcommand."""
    if argv[:1] and argv[0] in MALLOC_TUNED:
        reexec_with_malloc_tuning()


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask), which is what a shared VM grants."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages; figures from a busy machine should say so."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def machine_name(device: Any = None) -> str:
    """Short label of the machine (and GPU) for tables: 'x86_64 2 cores, NVIDIA H200'."""
    name = f"{platform.machine()} {usable_cores()} cores"
    if device is not None and getattr(device, "type", "cpu") == "cuda":
        import torch

        name += f", {torch.cuda.get_device_name(device)}"
    return name


def bf16_native() -> bool:
    """Whether the CPU computes bf16 natively; without it oneDNN emulates bf16, slowly."""
    from rrd_fast.precision import native_cpu_precisions

    return "bf16" in native_cpu_precisions()


def machine_info() -> dict[str, Any]:
    """Everything about this process's machine and settings that moves the figures."""
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_native": bf16_native(),
        "glibc_tunables": os.environ.get(TUNABLES_VAR, ""),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "load_average_start": load_average(),
    }


def per_sample_loader(dataset: Any, batch: int, workers: int, order: Any = None, pin_memory: bool = False) -> Any:
    """The baseline the pipelines are compared with: a torch DataLoader over a per-sample dataset.

    `order` (sample indices) fixes the visiting order; without it the loader shuffles, as
    a typical training script does.
    """
    import torch

    return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=order is None,
                                       sampler=None if order is None else [int(i) for i in order], num_workers=workers,
                                       drop_last=True, pin_memory=pin_memory)


def write_json(path: str | Path, data: Any) -> None:
    """Atomic, with sorted keys: a rerun's file diffs cleanly against the last one."""
    write_json_atomic(path, data)
