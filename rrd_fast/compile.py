"""torch.compile for a run (`train.compile`): whether to compile, and compiling its parts.

The compiled parts are the distillation step (`DistillModule`: student forward, every loss term
and the memory updates; AOTAutograd compiles the backward with it), the online teacher's
forward, the teacher-cache builder's forward and evaluation. The init stage of two-stage
methods stays eager (a few epochs of small connector losses).

Compilation costs tens of seconds per graph on a CPU, once per process; Inductor's on-disk cache
makes later runs with the same graphs (the other seeds and methods of a sweep) start in seconds.
Unless TORCHINDUCTOR_CACHE_DIR is set, that cache lives in the user's cache folder, beside the
auto-backend table, so every run of a sweep on one machine shares it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

# `auto` compiles CUDA runs of at least this many training steps: shorter runs (smoke tests, demos)
# would spend more time compiling than compiling saves. On CPUs `auto` stays eager: there
# `python -m rrd_fast.bench compile` finds compiled steps no faster than eager ones (oneDNN's
# convolutions dominate either way), so compiling would only add its start-up.
AUTO_MIN_STEPS = 2000
CUDA_ONLY_MODES = ("reduce-overhead", "max-autotune")


def inductor_cache_dir() -> Path:
    """Where compiled kernels are kept across runs: TORCHINDUCTOR_CACHE_DIR, else the user's cache folder."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "rrd-fast" / "inductor"


def resolve_compile(setting: str, steps: int, device: torch.device) -> tuple[bool, str]:
    """Whether to compile, and the reason printed with the run's info lines."""
    if setting == "on":
        return True, "train.compile=on"
    if setting == "off":
        return False, "train.compile=off"
    if device.type != "cuda":
        return False, (f"train.compile=auto: off on {device.type} (compiled steps measured no faster than eager "
                       "there: python -m rrd_fast.bench compile; train.compile=on compiles anyway)")
    if steps >= AUTO_MIN_STEPS:
        return True, f"train.compile=auto: on, {steps} training steps >= {AUTO_MIN_STEPS}"
    return False, f"train.compile=auto: off, {steps} training steps < {AUTO_MIN_STEPS} (compiling would not pay back)"


class Compiler:
    """Compiles a run's parts with one backend and mode; `enabled=False` leaves everything eager.

    An enabled Compiler starts from empty in-memory dynamo caches: code compiled earlier in this process
    (another run in a test session or notebook, another variant of a benchmark) would count against
    dynamo's recompile limit (8 per function, every model instance of one class sharing it), past which
    dynamo runs that function eagerly with only a warning. Compiled kernels stay in the on-disk cache.
    """

    def __init__(self, enabled: bool, backend: str = "inductor", mode: str = "default",
                 device: torch.device | None = None) -> None:
        self.enabled = enabled
        if enabled:
            torch._dynamo.reset()
        self.backend = backend
        # CUDA graphs and autotuning need a GPU; on a CPU they fall back to the default mode.
        cpu = device is None or device.type != "cuda"
        self.mode = "default" if cpu and mode in CUDA_ONLY_MODES else mode
        if enabled and backend == "inductor":
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(inductor_cache_dir()))

    def _options(self) -> dict[str, Any]:
        # Static shapes: every training batch has one shape and evaluation is padded to one, so a second
        # shape (the teacher's forward at the eval batch, say) gets its own specialised graph.
        options: dict[str, Any] = {"backend": self.backend, "dynamic": False}
        if self.backend == "inductor" and self.mode != "default":
            options["mode"] = self.mode
        return options

    def module(self, module: nn.Module) -> nn.Module:
        """Compile `module`'s forward in place (its state_dict keys stay unchanged)."""
        if self.enabled:
            module.compile(**self._options())
        return module

    def function(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """A compiled wrapper of `fn` (the original stays callable eagerly)."""
        return torch.compile(fn, **self._options()) if self.enabled else fn


def sgd(params: list[nn.Parameter], device: torch.device, **hyper: Any) -> torch.optim.SGD:
    """SGD with the fused step on CUDA (one kernel for all parameters instead of several per tensor). On a
    CPU the per-tensor loop stays: the foreach step computes the same update but measured no faster there."""
    if device.type == "cuda":
        return torch.optim.SGD(params, fused=True, **hyper)
    return torch.optim.SGD(params, foreach=False, **hyper)
