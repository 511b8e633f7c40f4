"""AB: distillation of activation boundaries (Heo et al., AAAI 2019), as RepDistiller runs it.

Init stage: a connector and the student's feature modules learn to put each connected
pre-ReLU stage output on the teacher's side of the ReLU boundary (a squared hinge with a
margin). The main stage adds no distillation loss (loops.py: `loss_kd = 0`): it returns zero
and reads nothing from the teacher. The connector is not in the main optimizer.

Modes, from helper/pretrain.py: `model_s.eval()` and then `init_modules.train()`, where the
init modules are the connector and `model_s.get_feat_modules()`; those are the student's own
modules, so they are back in train mode (BatchNorm on batch statistics, running stats
updated). Only student modules outside them stay in eval mode (the classifier; for WRN
also the final `bn1`, which makes the last pre-ReLU feature). The teacher is in eval mode.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from pipelines.batch import Batch
from rrd_fast.methods.base import (InitStage, LossTerm, MethodError, MethodSpec, NetInfo, TermContext, full_precision,
                                   register_method, register_term)
from rrd_fast.models import ModelOutput


@dataclass(frozen=True)
class ABOptions:
    init_epochs: int = 30
    margin: float = 1.0


def _regressor(s: tuple[int, ...], t: tuple[int, ...], layer: str) -> nn.Module:
    """models/util.py ConvReg(use_relu=False) with its keys (`conv`, `bn`); keyless when C and H match."""
    (s_c, s_h, s_w), (t_c, t_h, t_w) = s, t
    if s_c == t_c and s_h == t_h:
        return nn.Sequential()
    if s_h == 2 * t_h:
        conv: nn.Module = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
    elif 2 * s_h == t_h:
        conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
    elif s_h >= t_h:
        conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
    else:
        raise MethodError(f"ab: cannot connect student {layer} {s} to teacher {layer} {t} (teacher map larger, not 2x)")
    return nn.Sequential(OrderedDict(conv=conv, bn=nn.BatchNorm2d(t_c)))


class Connector(nn.Module):
    """One regressor per stage; state_dict keys equal models/util.py Connector's (`connectors.{i}.…`)."""

    def __init__(self, s_shapes: list[tuple[int, ...]], t_shapes: list[tuple[int, ...]]) -> None:
        super().__init__()
        pairs = enumerate(zip(s_shapes, t_shapes), start=1)
        self.connectors = nn.ModuleList(_regressor(s, t, f"stage{i}") for i, (s, t) in pairs)


def ab_loss(g_s: list[torch.Tensor], g_t: list[torch.Tensor], margin: float) -> torch.Tensor:
    """distiller_zoo/AB.py, summed over stages: stage i of n weighted 2^(i-n+1), / batch size, × 3/1000."""
    losses = []
    for i, (s, t) in enumerate(zip(g_s, g_t)):
        off, on = ((s > -margin) & (t <= 0)).to(s.dtype), ((s <= margin) & (t > 0)).to(s.dtype)
        hinge = ((s + margin).pow(2) * off + (s - margin).pow(2) * on).sum()
        losses.append(2.0 ** (i - len(g_s) + 1) * hinge / s.shape[0] / 1000 * 3)
    return torch.stack(losses).sum()


@register_term
class AB(LossTerm):
    name = "ab"
    Options = ABOptions
    init_teacher_fields = ("pre_relu",)

    def __init__(self, options: ABOptions, student: NetInfo, teacher: NetInfo | None, context: TermContext) -> None:
        super().__init__(options, student, teacher, context)
        assert teacher is not None
        s, t = list(student.feat_shapes[1:-1]), list(teacher.feat_shapes[1:-1])
        if options.init_epochs < 0:
            raise MethodError(f"method.options.ab.init_epochs: must be >= 0, got {options.init_epochs}")
        if not s or len(s) != len(t):
            raise MethodError(f"ab: student {student.arch} stages {s} and teacher {teacher.arch} {t} must pair up")
        self.connector = Connector(s, t)
        self.connector.requires_grad_(False)  # trained in the init stage only (the trainer enables it)

    def init_stage(self) -> InitStage | None:
        return InitStage(self.options.init_epochs, (self.connector,), True, self.init_teacher_fields) \
            if self.options.init_epochs else None

    def init_loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> torch.Tensor:
        assert teacher is not None
        with torch.autocast(device_type=student.logits.device.type, enabled=False):
            g_s = [c(full_precision(f)) for c, f in zip(self.connector.connectors, student.pre_relu)]
            return ab_loss(g_s, [full_precision(f.detach()) for f in teacher.pre_relu], self.options.margin)

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> torch.Tensor:
        return torch.zeros((), dtype=full_precision(student.logits).dtype, device=student.logits.device)


register_method(MethodSpec("ab", term="ab", uses_teacher=True, default_weights=(1.0, 0.0, 1.0)))
