"""AT: attention transfer (Zagoruyko & Komodakis, ICLR 2017), as RepDistiller's distiller_zoo/AT.py.

Per stage pair, each map becomes a spatial attention vector (channel mean of f^p, flattened,
L2-normalised per sample), and the loss is the mean squared difference; loops.py sums the
stage losses. Reference quirks reproduced: stages are paired in order and the longer list is
cut (zip); when heights differ the larger map is average-pooled to a square of the smaller height.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipelines.batch import Batch
from rrd_fast.methods.base import (LossTerm, MethodSpec, NetInfo, TermContext, check_stage_pairs, full_precision,
                                   pool_to_smaller, register_method, register_term)
from rrd_fast.models import ModelOutput


@dataclass(frozen=True)
class ATOptions:
    p: float = 2.0



def at_loss(f_s: torch.Tensor, f_t: torch.Tensor, p: float) -> torch.Tensor:
    f_s, f_t = pool_to_smaller(f_s, f_t)
    attention = lambda f: F.normalize(f.pow(p).mean(1).flatten(1))  # noqa: E731
    return (attention(f_s) - attention(f_t)).pow(2).mean()



@register_term
class AT(LossTerm):
    name = "at"
    Options = ATOptions
    teacher_fields = ("stages",)

    def __init__(self, options: ATOptions, student: NetInfo, teacher: NetInfo | None, context: TermContext) -> None:
        super().__init__(options, student, teacher, context)
        assert teacher is not None
        check_stage_pairs("at", student, teacher)

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> torch.Tensor:
        assert teacher is not None
        with torch.autocast(device_type=student.pooled.device.type, enabled=False):
            pairs = zip(student.stages, teacher.stages)
            return sum(at_loss(full_precision(s), full_precision(t.detach()), self.options.p) for s, t in pairs)


register_method(MethodSpec("at", term="at", uses_teacher=True, default_weights=(1.0, 0.0, 1000.0)))
