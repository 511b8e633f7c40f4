"""Hinton KD: KL(softmax(t/T) || softmax(s/T)), summed over classes and batch, / batch size, × T²."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipelines.batch import Batch
from rrd_fast.methods.base import (LossTerm, MethodError, MethodSpec, NetInfo, TermContext, full_precision, register_method,
                                   register_term)
from rrd_fast.models import ModelOutput


@dataclass(frozen=True)
class KDOptions:
    T: float = 4.0


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    log_p_s = F.log_softmax(full_precision(student_logits) / T, dim=1)
    p_t = F.softmax(full_precision(teacher_logits) / T, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="sum") * (T * T) / student_logits.shape[0]


@register_term
class KD(LossTerm):
    name = "kd"
    Options = KDOptions
    teacher_fields = ("logits",)

    def __init__(self, options: KDOptions, student: NetInfo, teacher: NetInfo | None, context: TermContext) -> None:
        super().__init__(options, student, teacher, context)
        if teacher is not None and teacher.num_classes != student.num_classes:
            raise MethodError(
                f"kd: student {student.arch} has {student.num_classes} classes but teacher {teacher.arch} has "
                f"{teacher.num_classes}; KD needs matching class counts"
            )

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> torch.Tensor:
        assert teacher is not None
        return kd_loss(student.logits, teacher.logits, self.options.T)


register_method(MethodSpec("vanilla", term=None, uses_teacher=False, default_weights=(1.0, 0.0, 0.0)))
register_method(MethodSpec("kd", term=None, uses_teacher=True, default_weights=(0.1, 0.9, 0.0)))
