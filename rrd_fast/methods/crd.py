"""CRD, Contrastive Representation Distillation (Tian et al., ICLR 2020), as RepDistiller's crd/.

Both pooled vectors are embedded (Linear, then L2 norm) and contrasted, in both directions,
against momentum banks of the N training samples with K other-class negatives each, by NCE
(`rrd_fast/memory/contrast.py`). Both embeddings are trained, as the reference puts both in
its optimizer. Negatives are drawn with replacement, a pure function of (seed, step, sample);
the reference's loader draws them without replacement when K is below the other-class count
(CIFAR-100: 16384 of 49500), which only changes how often a row repeats within a draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.batch import Batch
from pipelines.errors import UserError
from rrd_fast.memory import MemorySpec, build_memory
from rrd_fast.methods.base import (LossTerm, MethodError, MethodSpec, NetInfo, TermContext, full_precision,
                                   register_method, register_term)
from rrd_fast.models import ModelOutput


@dataclass(frozen=True)
class CRDOptions:  # RepDistiller's argument names and defaults
    feat_dim: int = 128
    nce_k: int = 16384  # negatives per sample
    nce_t: float = 0.07
    nce_m: float = 0.5  # bank momentum


class Embed(nn.Module):
    """Flatten, Linear, L2 norm; its `linear.*` keys match the reference's crd/criterion.py Embed."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)


@register_term
class CRD(LossTerm):
    """Exposes `embed_s`, `embed_t` (both trainable) and `memory` (banks, Z: `rrd_fast.memory.contrast.ContrastMemory`)."""

    name = "crd"
    Options = CRDOptions
    teacher_fields = ("pooled",)

    def __init__(self, options: CRDOptions, student: NetInfo, teacher: NetInfo | None, context: TermContext) -> None:
        super().__init__(options, student, teacher, context)
        assert teacher is not None
        self.embed_s = Embed(student.pooled_dim, options.feat_dim)
        self.embed_t = Embed(teacher.pooled_dim, options.feat_dim)
        spec = MemorySpec(size=options.nce_k, dim=options.feat_dim, seed=context.seed, world_size=context.world_size,
                          num_samples=context.num_train_samples, labels=context.train_labels, momentum=options.nce_m)
        try:
            self.memory = build_memory("contrast", context.memory_sharding, spec)
        except UserError:
            raise
        except ValueError as exc:
            raise MethodError(f"method.options.crd: {exc}") from None

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> torch.Tensor:
        assert teacher is not None
        with torch.autocast(device_type=student.pooled.device.type, enabled=False):
            z_s = self.embed_s(full_precision(student.pooled))
            z_t = self.embed_t(full_precision(teacher.pooled).detach())
            t = self.options.nce_t
            # Mean over this rank's samples; DDP's average over ranks makes it the global batch's loss.
            return self.memory.loss(z_s, z_t, batch, t, t, "after").mean()


register_method(MethodSpec("crd", term="crd", uses_teacher=True, default_weights=(1.0, 0.0, 0.8)))
register_method(MethodSpec("crd_kd", term="crd", uses_teacher=True, default_weights=(1.0, 1.0, 0.8)))
