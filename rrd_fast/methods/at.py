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
from rrd_fast.methods.base import (LossTerm, MethodError, MethodSpec, NetInfo, TermContext, full_precision,
                                   register_method, register_term)
from rrd_fast.models import ModelOutput


@dataclass(frozen=True)
class ATOptions:
    p: float = 2.0


def _pool_to_smaller(f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        return F.adaptive_avg_pool2d(f_s, (t_h, t_h)), f_t
    if s_h < t_h:
        return f_s, F.adaptive_avg_pool2d(f_t, (s_h, s_h))
    return f_s, f_t


def at_loss(f_s: torch.Tensor, f_t: torch.Tensor, p: float) -> torch.Tensor:
    f_s, f_t = _pool_to_smaller(f_s, f_t)
    attention = lambda f: F.normalize(f.pow(p).mean(1).flatten(1))  # noqa: E731
    return (attention(f_s) - attention(f_t)).pow(2).mean()


def _unpairable(s: tuple[int, ...], t: tuple[int, ...]) -> bool:
    """What the reference crashes on: not a C x H x W map, or equal heights with unequal widths."""
    return len(s) != 3 or len(t) != 3 or (s[1] == t[1] and s[2] != t[2])


@register_term
class AT(LossTerm):
    name = "at"
    Options = ATOptions
    teacher_fields = ("stages",)

    def __init__(self, options: ATOptions, student: NetInfo, teacher: NetInfo | None, context: TermContext) -> None:
        super().__init__(options, student, teacher, context)
        assert teacher is not None
        s, t = student.feat_shapes[1:-1], teacher.feat_shapes[1:-1]
        if not s or not t or any(map(_unpairable, s, t)):
            raise MethodError(f"at: cannot pair student {student.arch} stages {list(s)} with teacher {teacher.arch} "
                              f"stages {list(t)} (need C x H x W maps, equal widths at equal heights)")

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> torch.Tensor:
        assert teacher is not None
        with torch.autocast(device_type=student.pooled.device.type, enabled=False):
            pairs = zip(student.stages, teacher.stages)
            return sum(at_loss(full_precision(s), full_precision(t.detach()), self.options.p) for s, t in pairs)


register_method(MethodSpec("at", term="at", uses_teacher=True, default_weights=(1.0, 0.0, 1000.0)))
