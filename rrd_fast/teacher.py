"""Teacher sources: the frozen teacher run online, or its outputs served from the teacher cache.

`open_teacher` picks one for a run, so the trainer only ever calls `teacher(batch, images)`.
Loading a teacher checkpoint (ours or a RepDistiller `.pth`) is `rrd_fast.checkpoint.load_teacher`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from accelerate import Accelerator
from torch import nn

from pipelines.batch import Batch
from rrd_fast.cache import CacheTooLarge, open_cached_teacher
from rrd_fast.compile import Compiler
from rrd_fast.config import RunConfig
from rrd_fast.methods.objective import teacher_fields_for
from rrd_fast.models import ModelOutput

TeacherSource = Callable[[Batch, torch.Tensor], ModelOutput]


class OnlineTeacher:
    """Runs the frozen teacher on each batch, without autograd, under the run's autocast."""

    def __init__(self, model: nn.Module, accelerator: Accelerator, compiler: Compiler | None = None) -> None:
        self.model = model
        self.accelerator = accelerator
        self.forward = compiler.function(model) if compiler is not None else model

    def __call__(self, batch: Batch, images: torch.Tensor) -> ModelOutput:
        with torch.no_grad(), self.accelerator.autocast():
            return self.forward(images, features=True)


def open_teacher(cfg: RunConfig, model: nn.Module, meta: dict[str, Any], data: Any, accelerator: Accelerator,
                 memory_format: torch.memory_format, dataset: dict[str, Any], rebuild_cache: bool = False,
                 compiler: Compiler | None = None) -> TeacherSource:
    """The cached teacher when `teacher.cache` is set (built or resumed here in single-process runs;
    `data.train` is wrapped to replay view e mod V), else the online one on the run's device.

    A cache too large for `teacher.cache_max_gb` is refused, or with `teacher.cache_fallback=online`
    replaced by the online teacher.
    """
    if cfg.teacher.cache:
        try:
            cached = open_cached_teacher(cfg, model, meta, data.train, accelerator.device, teacher_fields_for(cfg.method),
                                         rebuild=rebuild_cache, may_build=accelerator.num_processes == 1,
                                         dataset=dataset, compiler=compiler)
        except CacheTooLarge as exc:
            if cfg.teacher.cache_fallback != "online":
                raise
            if accelerator.is_main_process:
                print(f"{exc}; teacher.cache_fallback=online: running the teacher online", flush=True)
        else:
            data.train = cached.wrap(data.train)
            return cached
    return OnlineTeacher(model.to(accelerator.device, memory_format=memory_format), accelerator, compiler)
