"""PKT (Passalis & Tefas, ECCV 2018) on pooled features, as RepDistiller's distiller_zoo/PKT.py.

Cosine similarities within the batch, mapped to [0, 1] and normalised per row, become
conditional probabilities; the loss is the mean over all B x B entries of p_t log(p_t / p_s),
with the reference's eps = 1e-7 inside the log and added to the norms. Rows the
normalisation turns into NaN are zeroed, as there. The norm's gradient at a zero row is 0
here (the reference's sqrt gives NaN); values are otherwise the same.
"""

from __future__ import annotations

import torch

from pipelines.batch import Batch
from rrd_fast.methods.base import LossTerm, MethodSpec, full_precision, register_method, register_term
from rrd_fast.models import ModelOutput

EPS = 1e-7


def similarity_probs(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    x = x.flatten(1)
    x = x / (x.norm(dim=1, keepdim=True) + eps)
    x = torch.where(torch.isnan(x), torch.zeros_like(x), x)
    sim = (x @ x.t() + 1.0) / 2.0
    return sim / sim.sum(dim=1, keepdim=True)


def pkt_loss(f_s: torch.Tensor, f_t: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    p_s, p_t = similarity_probs(f_s, eps), similarity_probs(f_t.detach(), eps)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


@register_term
class PKT(LossTerm):
    name = "pkt"
    teacher_fields = ("pooled",)

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> torch.Tensor:
        assert teacher is not None
        with torch.autocast(device_type=student.pooled.device.type, enabled=False):
            return pkt_loss(full_precision(student.pooled), full_precision(teacher.pooled))


register_method(MethodSpec("pkt", term="pkt", uses_teacher=True, default_weights=(1.0, 0.0, 30000.0)))
