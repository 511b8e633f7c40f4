"""Shared DALI plumbing: the lazy import, a plan-driven runner, and DALI-to-torch conversion.

Every DALI backend here is fed by external sources whose callbacks pull the next planned
batch (sample indices from `EpochSampler`, augmentation parameters from `pipelines.augment`).
DALI returns outputs in the order it pulled its inputs, so the runner keeps the batches that
DALI has pulled but not yet returned and pairs each output with its exact sample indices.
That also ties every pipeline error to the batch that caused it, and lets a backend retry
the batches that were in flight after it has dealt with the error (e.g. skipped a corrupt file).

Any exception, or an epoch abandoned half way, discards the DALI pipeline; the next call
builds a fresh one, so no half-consumed prefetch queue or broken executor is ever reused.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from pipelines.errors import DataError

INSTALL_HINT = "install the `dali` extra (pip install nvidia-dali-cuda120)"


def import_dali() -> Any:
    """The `nvidia.dali` module, or a DataError saying how to get it."""
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn  # noqa: F401
        import nvidia.dali.types  # noqa: F401
    except ImportError as exc:
        raise DataError(f"data.pipeline=dali: NVIDIA DALI is not importable ({exc}); {INSTALL_HINT}") from None
    return dali


def dali_available() -> bool:
    try:
        import_dali()
    except DataError:
        return False
    return True


def default_threads(device: torch.device) -> int:
    """DALI worker threads: the cores this process may use, capped (GPU pipelines need few)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 4 if device.type == "cuda" else 8))


def default_lanes(device: torch.device) -> int:
    """Independent DALI pipelines for small in-memory images: one per core on CPU (at most 4),
    one on a GPU.

    DALI's per-sample bookkeeping runs largely serially within one pipeline, so a second
    worker thread barely helps 32x32 images while a second pipeline does (the bare DALI
    graph is markedly faster with two lanes of one thread than with one lane of two). In
    the full pipeline the Python thread that feeds the lanes shares the cores, and the gain
    shrinks to about the run-to-run noise; `rrd_fast.bench pipelines --dali-lanes` measures it.
    A GPU pipeline keeps one lane until the GPU benchmark says otherwise.
    """
    if device.type == "cuda":
        return 1
    return min(default_threads(device), 4)


def device_id_for(device: torch.device) -> int | None:
    """DALI's `device_id`: None builds a CPU-only pipeline (no CUDA needed)."""
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def output_dtype(dtype: torch.dtype) -> Any:
    """DALI output type for a requested torch dtype (bf16 is converted by torch afterwards)."""
    types = import_dali().types
    if dtype == torch.float16:
        return types.FLOAT16
    if dtype in (torch.float32, torch.bfloat16):
        return types.FLOAT
    raise ValueError(f"pipeline output dtype must be float32, float16 or bfloat16, got {dtype}")


def to_torch(tl: Any, device: torch.device, dtype: torch.dtype, stream: Any = None) -> torch.Tensor:
    """Copy one dense DALI TensorList into a new torch tensor on `device` with `dtype`."""
    if device.type == "cuda":
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        dense = tl.as_tensor()
        out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=device)
        feed_ndarray(dense, out, cuda_stream=stream)
    else:
        out = torch.from_numpy(tl.as_array())
    return out if out.dtype == dtype else out.to(dtype)


def dali_images(outputs: list[Any], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The image output (the first) of one DALI pipeline run as a torch tensor on `device` with `dtype`."""
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    return to_torch(outputs[0], device, dtype, stream)


@dataclass
class Work:
    """One planned batch: its sample indices, augmentation epoch and parameters, and its DALI inputs."""

    index: np.ndarray
    epoch: int
    aug: np.ndarray
    inputs: tuple[Any, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Source:
    """One DALI external source: where its data lives and what it holds."""

    dtype: Any
    ndim: int
    layout: str = ""
    device: str = "cpu"


class _Feed:
    """Hands each external source the next planned batch's input, one batch per DALI iteration.

    DALI calls every source callback once per iteration, in no promised order; each callback
    has its own cursor into the same list of pulled batches, so they always agree.
    """

    def __init__(self, n_sources: int, make_inputs: Callable[[Work], tuple[Any, ...]]) -> None:
        self.make_inputs = make_inputs
        self.n_sources = n_sources
        self.start(iter(()))

    def start(self, works: Iterator[Work]) -> None:
        self.works = works
        self.pulled: deque[Work] = deque()  # pulled by DALI, output not yet returned
        self.base = 0  # iterations already returned
        self.served = [0] * self.n_sources

    def callback(self, k: int) -> Callable[[], Any]:
        def source() -> Any:
            i = self.served[k] - self.base
            if i == len(self.pulled):
                work = next(self.works)  # StopIteration ends DALI's epoch
                if work.inputs is None:
                    work.inputs = self.make_inputs(work)
                self.pulled.append(work)
            self.served[k] += 1
            return self.pulled[i].inputs[k]

        return source

    def returned(self) -> Work:
        self.base += 1
        return self.pulled.popleft()

    def in_flight(self) -> list[Work]:
        return list(self.pulled)


ErrorHandler = Callable[[list[Work], BaseException], list[Work]]


class DaliRunner:
    """Builds a DALI pipeline over external sources and runs planned batches through it.

    `define(inputs)` receives one DataNode per `Source` and returns the pipeline outputs.
    `make_inputs(work)` returns one batch per source. `on_error(in_flight, exc)` is called
    when DALI fails: it raises a clear error or returns the batches to retry.
    """

    def __init__(
        self,
        sources: Sequence[Source],
        define: Callable[[list[Any]], Sequence[Any]],
        make_inputs: Callable[[Work], tuple[Any, ...]],
        batch_size: int,
        device: torch.device,
        num_threads: int | None = None,
        prefetch: int = 2,
        on_error: ErrorHandler | None = None,
    ) -> None:
        self.dali = import_dali()
        self.sources = list(sources)
        self.define = define
        self.batch_size = batch_size
        self.device = device
        self.num_threads = num_threads or default_threads(device)
        self.prefetch = prefetch
        self.on_error = on_error
        self._feed = _Feed(len(self.sources), make_inputs)
        self._pipe: Any = None
        self._owner: object | None = None  # the run() currently driving the pipeline

    def _pipeline(self) -> Any:
        if self._pipe is None:
            fn = self.dali.fn
            pipe = self.dali.Pipeline(batch_size=self.batch_size, num_threads=self.num_threads,
                                      device_id=device_id_for(self.device), prefetch_queue_depth=self.prefetch)
            with pipe:
                nodes = [fn.external_source(source=self._feed.callback(k), batch=True, device=s.device, dtype=s.dtype,
                                            ndim=s.ndim, layout=s.layout or None, no_copy=s.device == "cpu")
                         for k, s in enumerate(self.sources)]
                pipe.set_outputs(*self.define(nodes))
            pipe.build()
            self._pipe = pipe
        return self._pipe

    def discard(self) -> None:
        """Drop the DALI pipeline (its threads end with it); the next run builds a new one."""
        self._pipe = None
        self._owner = None
        self._feed.start(iter(()))

    def run(self, works: Iterable[Work]) -> Iterator[tuple[Work, list[Any]]]:
        """An iterator of (work, DALI outputs) for every planned batch, in order.

        The call itself takes the pipeline over: a run started earlier and not finished,
        even one not iterated yet, then stops with an error, and its prefetched batches are
        discarded with the pipeline.
        """
        if self._owner is not None:
            self.discard()
        token = self._owner = object()
        return self._run(token, works)

    def _run(self, token: object, works: Iterable[Work]) -> Iterator[tuple[Work, list[Any]]]:
        if self._owner is not token:
            raise RuntimeError("this epoch's DALI pipeline was taken over by a newer epoch() call")
        pipe = self._pipeline()
        self._feed.start(iter(works))
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        finished = False
        try:
            while True:
                if self._owner is not token:
                    raise RuntimeError("this epoch's DALI pipeline was taken over by a newer epoch() call")
                try:
                    outputs = pipe.run(stream) if stream is not None else pipe.run()
                except StopIteration:
                    finished = True
                    break
                except (DataError, KeyboardInterrupt):
                    raise
                except Exception as exc:  # DALI reports operator failures as RuntimeError
                    in_flight, rest = self._feed.in_flight(), self._feed.works
                    self.discard()
                    if self.on_error is None:
                        raise
                    retry = self.on_error(in_flight, exc)
                    self._owner = token
                    pipe = self._pipeline()
                    self._feed.start(chain(retry, rest))
                    continue
                yield self._feed.returned(), list(outputs)
        finally:
            if self._owner is token:
                if finished:
                    pipe.reset()
                    self._owner = None
                    self._feed.start(iter(()))
                else:
                    self.discard()


def round_robin(runners: Sequence[DaliRunner], works: Sequence[Work]) -> Iterator[tuple[Work, list[Any]]]:
    """Run planned batch i on runner i mod len(runners) and yield the results in plan order.

    Each runner owns its own DALI pipeline, so they prepare and process their batches
    concurrently; each is fed a fixed share of the plan, so the outcome never depends on timing.
    """
    lanes = len(runners)
    runs = [runner.run(works[k::lanes]) for k, runner in enumerate(runners)]
    try:
        for step in range(len(works)):
            yield next(runs[step % lanes])
        for run in runs:  # each lane reaches the end of its plan, so it keeps its pipeline for the next epoch
            for _ in run:
                raise RuntimeError("a DALI lane returned more batches than were planned")
    finally:
        for run in runs:
            run.close()


def first_error_line(exc: BaseException) -> str:
    """The informative line of a DALI error (it wraps the cause in a traceback of the graph)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if "encountered:" in lines:
        after = lines[lines.index("encountered:") + 1:]
        lines = [ln for ln in after if "pipeline object is no longer valid" not in ln] or lines
    return (lines[0] if lines else type(exc).__name__)[:200]
