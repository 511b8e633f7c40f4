"""Relational Representation Distillation (arXiv 2407.12073).

The student's embedding is trained to reproduce, over a queue of past teacher
embeddings, the teacher's sharpened similarity distribution:
  L = mean_i -sum_k softmax(z_t Q^T / tau_t)[i,k] log softmax(z_s Q^T / tau_s)[i,k].
Two versions of the authors' code differ in temperatures and enqueue order; both are
presets (`paper`, the default, matches the published CIFAR-100 numbers). The memory is a
FIFO queue of K teacher keys (`memory: fifo`) or CRD's momentum banks with K class-aware
negatives per sample (`memory: momentum`); how it is split across processes is
`distributed.memory_sharding`, which this term never needs to know.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.batch import Batch
from pipelines.errors import UserError
from rrd_fast.memory import MemorySpec, build_memory
from rrd_fast.methods.base import (LossTerm, MethodError, MethodSpec, NetInfo, TermContext, full_precision, register_method,
                                   register_term)
from rrd_fast.models import ModelOutput

PRESETS: dict[str, dict[str, object]] = {
    # Code released with the July 2024 paper: own key not in the queue (MoCo order).
    "paper": {"tau_s": 0.04, "tau_t": 0.10, "enqueue": "after"},
    # Reference code since Feb 2025: own key in the queue before the loss.
    "2025": {"tau_s": 0.1, "tau_t": 0.02, "enqueue": "before"},
}


@dataclass(frozen=True)
class RRDOptions:
    preset: Literal["paper", "2025"] = "paper"
    tau_s: float | None = None  # None: take the preset's value
    tau_t: float | None = None
    enqueue: Literal["before", "after"] | None = None
    queue_size: int = 16384  # K: queue rows (fifo) or negatives per sample (momentum)
    feat_dim: int = 128
    memory: Literal["fifo", "momentum"] = "fifo"
    momentum: float = 0.5  # momentum memory: rows become normalize(m*row + (1-m)*z); CRD's 0.5

    def resolved(self) -> tuple[float, float, str]:
        preset = PRESETS[self.preset]
        tau_s = self.tau_s if self.tau_s is not None else float(preset["tau_s"])
        tau_t = self.tau_t if self.tau_t is not None else float(preset["tau_t"])
        enqueue = self.enqueue if self.enqueue is not None else str(preset["enqueue"])
        return tau_s, tau_t, enqueue


@register_term
class RRD(LossTerm):
    """Exposes `embed_s`, `embed_t` (nn.Linear) and `memory` (`queue`: this rank's rows of a FIFO queue).

    With the momentum memory the banks are always updated after the loss, as in the
    reference; `enqueue` only orders the FIFO queue.

    `embed_t` is a fixed random projection: the target distribution is detached, so it
    never receives a gradient in the reference either, and it is left out of training.
    """

    name = "rrd"
    Options = RRDOptions
    teacher_fields = ("pooled",)

    def __init__(self, options: RRDOptions, student: NetInfo, teacher: NetInfo | None, context: TermContext) -> None:
        super().__init__(options, student, teacher, context)
        assert teacher is not None
        self.tau_s, self.tau_t, self.enqueue_when = options.resolved()
        self.embed_s = nn.Linear(student.pooled_dim, options.feat_dim)
        self.embed_t = nn.Linear(teacher.pooled_dim, options.feat_dim)
        self.embed_t.requires_grad_(False)
        spec = MemorySpec(size=options.queue_size, dim=options.feat_dim, seed=context.seed, world_size=context.world_size,
                          num_samples=context.num_train_samples, labels=context.train_labels, momentum=options.momentum)
        try:
            self.memory = build_memory(options.memory, context.memory_sharding, spec)
        except UserError:
            raise
        except ValueError as exc:
            raise MethodError(f"method.options.rrd: {exc}") from None

    @property
    def queue(self) -> torch.Tensor:
        return self.memory.queue

    def embed(self, student_pooled: torch.Tensor, teacher_pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z_s = F.normalize(self.embed_s(full_precision(student_pooled)), dim=1)
        with torch.no_grad():
            z_t = F.normalize(self.embed_t(full_precision(teacher_pooled)), dim=1)
        return z_s, z_t

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> torch.Tensor:
        assert teacher is not None
        with torch.autocast(device_type=student.pooled.device.type, enabled=False):
            z_s, z_t = self.embed(student.pooled, teacher.pooled)
            # Per-sample losses of this rank's samples; their mean, averaged over ranks by DDP, is the
            # global-batch loss (and gradient) whatever the memory's sharding.
            return self.memory.loss(z_s, z_t, batch, self.tau_s, self.tau_t, self.enqueue_when).mean()


register_method(MethodSpec("rrd", term="rrd", uses_teacher=True, default_weights=(1.0, 0.0, 1.0)))
register_method(MethodSpec("rrd_kd", term="rrd", uses_teacher=True, default_weights=(1.0, 1.0, 1.0)))
