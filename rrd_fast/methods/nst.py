"""NST: neuron selectivity transfer (Huang & Wang, 2017), as RepDistiller's distiller_zoo/NST.py.

Per stage pair, each channel's map is flattened and L2-normalised, and the loss is the squared
MMD with the polynomial kernel (x.y)^2 between the student's and teacher's channel sets (the
reference's `full_loss`, teacher-teacher part detached); loops.py sums the stage losses. The
kernel means are computed from C x C Gram matrices, which equals the reference's broadcast
product without its B x C x C x HW intermediate. Reference quirks reproduced: stages paired by
zip (longer list cut); the larger map average-pooled to a square of the smaller height.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipelines.batch import Batch
from rrd_fast.methods.base import (LossTerm, MethodSpec, NetInfo, TermContext, check_stage_pairs, full_precision,
                                   pool_to_smaller, register_method, register_term)
from rrd_fast.models import ModelOutput




def _kernel_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()


def nst_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    f_s, f_t = pool_to_smaller(f_s, f_t)
    f_s, f_t = F.normalize(f_s.flatten(2), dim=2), F.normalize(f_t.flatten(2), dim=2)
    return _kernel_mean(f_t, f_t).detach() + _kernel_mean(f_s, f_s) - 2 * _kernel_mean(f_s, f_t)


@register_term
class NST(LossTerm):
    name = "nst"
    teacher_fields = ("stages",)

    def __init__(self, options: None, student: NetInfo, teacher: NetInfo | None, context: TermContext) -> None:
        super().__init__(options, student, teacher, context)
        assert teacher is not None
        check_stage_pairs("nst", student, teacher)

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> torch.Tensor:
        assert teacher is not None
        with torch.autocast(device_type=student.pooled.device.type, enabled=False):
            pairs = zip(student.stages, teacher.stages)
            return sum(nst_loss(full_precision(s), full_precision(t.detach())) for s, t in pairs)


register_method(MethodSpec("nst", term="nst", uses_teacher=True, default_weights=(1.0, 0.0, 50.0)))
