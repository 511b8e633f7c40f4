"""Latency of one call, measured the way a deployment sees it.

Warm-up calls run first and are never recorded. On CPU each call is timed with
`perf_counter_ns`; on CUDA with a pair of `torch.cuda.Event`s around the call, waiting on
the end event after every call so that each sample is one complete request, not a
queue of overlapping launches.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch


@dataclass(frozen=True)
class Latency:
    """Per-call latency in milliseconds over the timed (post-warm-up) iterations."""

    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    iterations: int
    warmup: int
    batch_size: int
    throughput_ips: float  # images per second: batch_size * iterations / total timed seconds
    timer: str

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def summarize(samples_ms: list[float], batch_size: int, warmup: int, timer: str) -> Latency:
    arr = np.asarray(samples_ms, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("no timed iterations")
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return Latency(
        p50_ms=float(p50), p90_ms=float(p90), p99_ms=float(p99), mean_ms=float(arr.mean()), min_ms=float(arr.min()),
        iterations=int(arr.size), warmup=warmup, batch_size=batch_size,
        throughput_ips=float(batch_size * arr.size / (arr.sum() / 1000.0)), timer=timer,
    )


def measure(fn: Callable[[torch.Tensor], object], x: torch.Tensor, warmup: int = 10, iters: int = 100,
            min_iters: int = 5, budget_s: float | None = None) -> Latency:
    """Time `fn(x)`: `warmup` unrecorded calls, then up to `iters` timed ones.

    With `budget_s`, timing stops early once at least `min_iters` calls were timed and the
    timed calls took `budget_s` seconds, so large batches on slow machines stay bounded.
    """
    if iters < 1 or warmup < 0:
        raise ValueError(f"iters must be >= 1 and warmup >= 0, got {iters} and {warmup}")
    cuda = x.device.type == "cuda"
    for _ in range(warmup):
        fn(x)
    samples: list[float] = []
    spent = 0.0
    if cuda:
        torch.cuda.synchronize(x.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(iters):
            start.record()
            fn(x)
            end.record()
            end.synchronize()
            samples.append(float(start.elapsed_time(end)))
            spent += samples[-1] / 1000.0
            if budget_s is not None and len(samples) >= min_iters and spent >= budget_s:
                break
        timer = "cuda_event"
    else:
        for _ in range(iters):
            t0 = time.perf_counter_ns()
            fn(x)
            samples.append((time.perf_counter_ns() - t0) / 1e6)
            spent += samples[-1] / 1000.0
            if budget_s is not None and len(samples) >= min_iters and spent >= budget_s:
                break
        timer = "perf_counter"
    return summarize(samples, int(x.shape[0]), warmup, timer)
