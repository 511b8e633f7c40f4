"""Latency of one call, measured the way a deployment sees it.

Warm-up calls run first and are never recorded. On CPU each call is timed with
`perf_counter_ns`; on CUDA with a pair of `torch.cuda.Event`s around the call, waiting on
the end event after every call so that each sample is one complete request, not a
queue of overlapping launches. Python's garbage collector is paused while timing, so a
collection does not land inside one call.

Throughput is derived from the same calls: batch size / median latency. A mean over the
calls would let one stalled call (a page fault, the machine's other tenants) set the
figure, and the table would show a p50 and an img/s that contradict each other. How far
p90 sits above p50 says how noisy a point was; above `NOISY_RATIO` it is flagged.
"""

from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch


# A point whose p90 exceeds its p50 by more than this factor is flagged as noisy.
NOISY_RATIO = 1.5


@dataclass(frozen=True)
class Latency:
    """Per-call latency in milliseconds over the timed (post-warm-up) calls, each on one batch of `batch_size`."""

    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    iterations: int
    warmup: int
    batch_size: int
    throughput_ips: float  # images per second at this batch size: batch_size / p50 latency
    p90_over_p50: float  # spread of the calls; above NOISY_RATIO the point is noisy
    noisy: bool
    timer: str

    def to_dict(self) -> dict[str, float | int | str | bool]:
        return asdict(self)


def summarize(samples_ms: list[float], batch_size: int, warmup: int, timer: str) -> Latency:
    arr = np.asarray(samples_ms, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("no timed iterations")
    p50, p90, p99 = (float(v) for v in np.percentile(arr, [50, 90, 99]))
    spread = p90 / p50 if p50 > 0 else float("inf")
    return Latency(
        p50_ms=p50, p90_ms=p90, p99_ms=p99, mean_ms=float(arr.mean()), min_ms=float(arr.min()),
        iterations=int(arr.size), warmup=warmup, batch_size=batch_size,
        throughput_ips=batch_size * 1000.0 / p50 if p50 > 0 else float("inf"),
        p90_over_p50=spread, noisy=bool(spread > NOISY_RATIO), timer=timer,
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
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        timer = _timed_calls(fn, x, iters, min_iters, budget_s, cuda, samples)
    finally:
        if gc_was_enabled:
            gc.enable()
    return summarize(samples, int(x.shape[0]), warmup, timer)


def _timed_calls(fn: Callable[[torch.Tensor], object], x: torch.Tensor, iters: int, min_iters: int,
                 budget_s: float | None, cuda: bool, samples: list[float]) -> str:
    """Append one latency (ms) per call to `samples`; returns the timer's name."""
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
    return timer
