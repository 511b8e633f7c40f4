"""VID (Ahn et al., CVPR 2019) over the stage outputs, as RepDistiller's distiller_zoo/VID.py.

Per stage pair, a 1x1-conv regressor (s_c -> t_c -> t_c -> t_c, as train_student.py builds
VIDLoss(s_c, t_c, t_c)) predicts the teacher map's mean under a Gaussian with a learned
per-channel variance softplus(log_scale) + eps; the loss is the mean negative log-likelihood
(without the constant), summed over stages. Reference quirks reproduced: stages are paired
in order and the longer list is cut (zip); when heights differ the larger map, student's or
teacher's, is average-pooled to a square of the smaller height.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.batch import Batch
from rrd_fast.methods.base import (LossTerm, MethodError, MethodSpec, NetInfo, TermContext, full_precision,
                                   pool_to_smaller, register_method, register_term)
from rrd_fast.models import ModelOutput


@dataclass(frozen=True)
class VIDOptions:
    init_pred_var: float = 5.0
    eps: float = 1e-5


class VIDHead(nn.Module):
    """One stage pair; `regressor.{0,2,4}.weight` and `log_scale` are the reference VIDLoss keys."""

    def __init__(self, s_c: int, t_c: int, init_pred_var: float, eps: float) -> None:
        super().__init__()
        self.regressor = nn.Sequential(nn.Conv2d(s_c, t_c, 1, bias=False), nn.ReLU(), nn.Conv2d(t_c, t_c, 1, bias=False),
                                       nn.ReLU(), nn.Conv2d(t_c, t_c, 1, bias=False))
        self.log_scale = nn.Parameter(torch.full((t_c,), math.log(math.expm1(init_pred_var - eps))))
        self.eps = eps

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        f_s, f_t = pool_to_smaller(f_s, f_t)
        var = (F.softplus(self.log_scale) + self.eps).view(1, -1, 1, 1)
        return (0.5 * ((self.regressor(f_s) - f_t) ** 2 / var + torch.log(var))).mean()


@register_term
class VID(LossTerm):
    """Exposes `heads` (nn.ModuleList of VIDHead), whose keys are the reference ModuleList's with prefix `heads.`."""

    name = "vid"
    Options = VIDOptions
    teacher_fields = ("stages",)

    def __init__(self, options: VIDOptions, student: NetInfo, teacher: NetInfo | None, context: TermContext) -> None:
        super().__init__(options, student, teacher, context)
        assert teacher is not None
        if not student.stage_channels or not teacher.stage_channels:
            raise MethodError(f"vid: needs stage features; student {student.arch} has stage channels "
                              f"{list(student.stage_channels)}, teacher {teacher.arch} {list(teacher.stage_channels)}")
        self.heads = nn.ModuleList(VIDHead(s, t, options.init_pred_var, options.eps)
                                   for s, t in zip(student.stage_channels, teacher.stage_channels))

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> torch.Tensor:
        assert teacher is not None
        with torch.autocast(device_type=student.pooled.device.type, enabled=False):
            pairs = zip(self.heads, student.stages, teacher.stages)
            return sum(head(full_precision(s), full_precision(t).detach()) for head, s, t in pairs)


register_method(MethodSpec("vid", term="vid", uses_teacher=True, default_weights=(1.0, 0.0, 1.0)))
