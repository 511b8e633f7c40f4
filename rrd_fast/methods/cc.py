"""CC (Peng et al., ICCV 2019) as RepDistiller implements it (distiller_zoo/CC.py).

Both pooled vectors pass through a linear embedding; the loss is the batch mean of
sum_c |e_s - e_t|[i] * |e_s - e_t|[i+1] over consecutive samples i, i+1 -- the reference's
restructured version of the authors' code, not the paper's kernel correlation. It is
reproduced as is (a batch of one gives NaN, as there). The teacher's embedding is
trained with the student, as the reference puts both embeddings in its optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipelines.batch import Batch
from rrd_fast.methods.base import LossTerm, MethodSpec, NetInfo, TermContext, full_precision, register_method, register_term
from rrd_fast.models import ModelOutput


@dataclass(frozen=True)
class CCOptions:
    feat_dim: int = 128


class LinearEmbed(nn.Module):
    """Flatten, then one linear layer; its `linear.*` keys match the reference's embedding."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


def correlation_loss(e_s: torch.Tensor, e_t: torch.Tensor) -> torch.Tensor:
    delta = (e_s - e_t).abs()
    return (delta[:-1] * delta[1:]).sum(dim=1).mean()


@register_term
class CC(LossTerm):
    """Exposes `embed_s` and `embed_t` (both trainable)."""

    name = "cc"
    Options = CCOptions
    teacher_fields = ("pooled",)

    def __init__(self, options: CCOptions, student: NetInfo, teacher: NetInfo | None, context: TermContext) -> None:
        super().__init__(options, student, teacher, context)
        assert teacher is not None
        self.embed_s = LinearEmbed(student.pooled_dim, options.feat_dim)
        self.embed_t = LinearEmbed(teacher.pooled_dim, options.feat_dim)

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> torch.Tensor:
        assert teacher is not None
        with torch.autocast(device_type=student.pooled.device.type, enabled=False):
            e_s = self.embed_s(full_precision(student.pooled))
            e_t = self.embed_t(full_precision(teacher.pooled).detach())
            return correlation_loss(e_s, e_t)


register_method(MethodSpec("cc", term="cc", uses_teacher=True, default_weights=(1.0, 0.0, 0.02)))
