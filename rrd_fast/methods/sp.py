"""SP: similarity-preserving KD (Tung & Mori, ICCV 2019), as RepDistiller's distiller_zoo/SP.py.

On the last stage map (feat[-2]), each network's B x B Gram matrix of flattened per-sample
features is row-L2-normalised; the loss is the squared Frobenius distance between the two,
divided by B^2. Channels and spatial sizes may differ: only the batch dimension is shared.
The reference returns a 1-element tensor; this term returns the same value as a scalar.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipelines.batch import Batch
from rrd_fast.methods.base import (LossTerm, MethodError, MethodSpec, NetInfo, TermContext, full_precision,
                                   register_method, register_term)
from rrd_fast.models import ModelOutput


def sp_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    b = f_s.shape[0]
    f_s, f_t = f_s.reshape(b, -1), f_t.reshape(b, -1)
    g_s, g_t = F.normalize(f_s @ f_s.t()), F.normalize(f_t @ f_t.t())
    return (g_t - g_s).pow(2).sum() / (b * b)


@register_term
class SP(LossTerm):
    name = "sp"
    teacher_fields = ("stages",)

    def __init__(self, options: None, student: NetInfo, teacher: NetInfo | None, context: TermContext) -> None:
        super().__init__(options, student, teacher, context)
        assert teacher is not None
        if len(student.feat_shapes) < 3 or len(teacher.feat_shapes) < 3:
            raise MethodError(f"sp: needs a last stage map; student {student.arch} features "
                              f"{list(student.feat_shapes)}, teacher {teacher.arch} {list(teacher.feat_shapes)}")

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> torch.Tensor:
        assert teacher is not None
        f_s, f_t = full_precision(student.stages[-1]), full_precision(teacher.stages[-1].detach())
        with torch.autocast(device_type=f_s.device.type, enabled=False):
            return sp_loss(f_s, f_t)


register_method(MethodSpec("sp", term="sp", uses_teacher=True, default_weights=(1.0, 0.0, 3000.0)))
