"""RKD (Park et al., CVPR 2019) on pooled features, as RepDistiller's distiller_zoo/RKD.py.

Distance term: pairwise Euclidean distances (squared distances clamped at 1e-12 before
the root, the diagonal set to 0), each divided by the mean of its positive entries, compared
with smooth L1. Angle term: cosines of the angle at every anchor i between j and k, over
all B^3 triples (zero difference vectors stay zero), compared with smooth L1. The teacher
side carries no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipelines.batch import Batch
from rrd_fast.methods.base import LossTerm, MethodSpec, full_precision, register_method, register_term
from rrd_fast.models import ModelOutput


@dataclass(frozen=True)
class RKDOptions:
    w_d: float = 25.0
    w_a: float = 50.0


def normalized_distances(e: torch.Tensor) -> torch.Tensor:
    sq = (e * e).sum(dim=1)
    dist = (sq[:, None] + sq[None, :] - 2.0 * (e @ e.t())).clamp_min(1e-12).sqrt()
    dist = torch.where(torch.eye(len(e), dtype=torch.bool, device=e.device), torch.zeros_like(dist), dist)
    positive = dist > 0  # the mean of the positive entries, without a data-dependent selection
    return dist / (torch.where(positive, dist, 0.0).sum() / positive.sum())


def angles(e: torch.Tensor) -> torch.Tensor:
    diff = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)  # diff[i, j] = e_j - e_i
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()


def rkd_loss(f_s: torch.Tensor, f_t: torch.Tensor, w_d: float, w_a: float) -> torch.Tensor:
    s, t = f_s.flatten(1), f_t.detach().flatten(1)
    loss_d = F.smooth_l1_loss(normalized_distances(s), normalized_distances(t))
    loss_a = F.smooth_l1_loss(angles(s), angles(t))
    return w_d * loss_d + w_a * loss_a


@register_term
class RKD(LossTerm):
    name = "rkd"
    Options = RKDOptions
    teacher_fields = ("pooled",)

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> torch.Tensor:
        assert teacher is not None
        with torch.autocast(device_type=student.pooled.device.type, enabled=False):
            return rkd_loss(full_precision(student.pooled), full_precision(teacher.pooled), self.options.w_d, self.options.w_a)


register_method(MethodSpec("rkd", term="rkd", uses_teacher=True, default_weights=(1.0, 0.0, 1.0)))
