"""FitNet hints (Romero et al., ICLR 2015), as RepDistiller's `--distill hint` runs it.

Feature `hint_layer` of RepDistiller's list (0 = stem) goes through models/util.py ConvReg and is
matched to the teacher's by MSE. The regressor trains with the student (train_student.py's
trainable_list) and shares its train/eval mode (loops.py: module_list.train()). ConvReg picks its
conv from the heights alone; pairs the reference cannot run (teacher map larger but not 2x, a
pooled vector, widths its conv does not map onto the teacher's) are refused when built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.batch import Batch
from rrd_fast.methods.base import (LossTerm, MethodError, MethodSpec, NetInfo, TermContext, full_precision,
                                   register_method, register_term)
from rrd_fast.models import ModelOutput


@dataclass(frozen=True)
class FitNetOptions:
    hint_layer: int = 2  # train_student.py --hint_layer


class HintRegressor(nn.Module):
    """models/util.py ConvReg(use_relu=True): its state_dict keys are `conv.*` and `bn.*`."""

    def __init__(self, s: tuple[int, ...], t: tuple[int, ...], layer: str) -> None:
        super().__init__()
        fail = f"fitnet: cannot regress student {layer} {s} onto teacher {layer} {t}"
        if len(s) != 3 or len(t) != 3:
            raise MethodError(f"{fail} (ConvReg needs C x H x W maps on both sides)")
        (s_c, s_h, s_w), (t_c, t_h, t_w) = s, t
        if s_h == 2 * t_h:
            conv, out = nn.Conv2d(s_c, t_c, 3, stride=2, padding=1), ((s_h - 1) // 2 + 1, (s_w - 1) // 2 + 1)
        elif 2 * s_h == t_h:
            conv, out = nn.ConvTranspose2d(s_c, t_c, 4, stride=2, padding=1), (2 * s_h, 2 * s_w)
        elif s_h >= t_h and s_w >= t_w:
            conv, out = nn.Conv2d(s_c, t_c, (1 + s_h - t_h, 1 + s_w - t_w)), (t_h, t_w)
        else:
            raise MethodError(f"{fail} (the teacher map is larger, and not exactly 2x)")
        if out != (t_h, t_w):
            raise MethodError(f"{fail} (the regressor would give {(t_c, *out)})")
        self.conv: nn.Module = conv
        self.bn = nn.BatchNorm2d(t_c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _feature(out: ModelOutput, index: int) -> torch.Tensor:
    return out.stem if index == 0 else out.stages[index - 1]


@register_term
class FitNet(LossTerm):
    """`regressor` holds ConvReg's keys, so a reference ConvReg state_dict loads into it unchanged."""

    name = "fitnet"
    Options = FitNetOptions
    teacher_fields = ("stages",)

    @classmethod
    def teacher_fields_for(cls, options: Any) -> tuple[str, ...]:
        return ("stem",) if options.hint_layer == 0 else ("stages",)

    def __init__(self, options: FitNetOptions, student: NetInfo, teacher: NetInfo | None, context: TermContext) -> None:
        super().__init__(options, student, teacher, context)
        assert teacher is not None
        h = options.hint_layer
        n_s, n_t = len(student.feat_shapes), len(teacher.feat_shapes)
        if isinstance(h, bool) or not isinstance(h, int) or not (0 <= h < min(n_s, n_t)):
            raise MethodError(f"fitnet: hint_layer {h!r} is not a feature index of student {student.arch} "
                              f"({n_s} features) and teacher {teacher.arch} ({n_t} features); 0 is the stem")
        layer = "stem" if h == 0 else f"feat[{h}]"
        self.regressor = HintRegressor(student.feat_shapes[h], teacher.feat_shapes[h], layer)
        self.teacher_fields = self.teacher_fields_for(options)

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> torch.Tensor:
        assert teacher is not None
        f_s = full_precision(_feature(student, self.options.hint_layer))
        f_t = full_precision(_feature(teacher, self.options.hint_layer).detach())
        with torch.autocast(device_type=f_s.device.type, enabled=False):
            return F.mse_loss(self.regressor(f_s), f_t)


register_method(MethodSpec("fitnet", term="fitnet", uses_teacher=True, default_weights=(1.0, 0.0, 100.0)))
