"""FSP: flow-of-solution-procedure matrices (Yim et al., CVPR 2017), as RepDistiller runs it.

Init stage only: the student's feature modules learn to match the teacher's Gram matrices
between consecutive feature maps of [stem, *stages] (the larger map average-pooled to the
smaller). The main stage adds no distillation loss (loops.py: `loss_kd = 0`), so it returns
zero and does not need the teacher. The matrices are C_i x C_(i+1), so the reference refuses
pairs whose channel counts differ at any of these layers; so do we, at construction.

Reproduced from helper/pretrain.py: `model_s.eval()` then `init_modules.train()`, where the
init modules are `model_s.get_feat_modules()`, so the student's feature modules train with
BatchNorm on batch statistics; only modules outside them stay in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipelines.batch import Batch
from rrd_fast.methods.base import (InitStage, LossTerm, MethodError, MethodSpec, NetInfo, TermContext, full_precision,
                                   register_method, register_term)
from rrd_fast.models import ModelOutput


@dataclass(frozen=True)
class FSPOptions:
    init_epochs: int = 30


def fsp_matrices(feats: list[torch.Tensor]) -> list[torch.Tensor]:
    """distiller_zoo/FSP.py compute_fsp: (B, C_(i+1), C_i) means over positions of top_j * bottom_i."""
    out = []
    for bot, top in zip(feats[:-1], feats[1:]):
        b_h, t_h = bot.shape[2], top.shape[2]
        if b_h > t_h:
            bot = F.adaptive_avg_pool2d(bot, (t_h, t_h))
        elif b_h < t_h:
            top = F.adaptive_avg_pool2d(top, (b_h, b_h))
        out.append(torch.bmm(top.flatten(2), bot.flatten(2).transpose(1, 2)) / bot[0, 0].numel())
    return out


@register_term
class FSP(LossTerm):
    name = "fsp"
    Options = FSPOptions
    init_teacher_fields = ("stem", "stages")

    def __init__(self, options: FSPOptions, student: NetInfo, teacher: NetInfo | None, context: TermContext) -> None:
        super().__init__(options, student, teacher, context)
        assert teacher is not None
        if options.init_epochs < 0:
            raise MethodError(f"method.options.fsp.init_epochs: must be >= 0, got {options.init_epochs}")
        s, t = student.feat_shapes[:-1], teacher.feat_shapes[:-1]
        names = ["stem"] + [f"stage{i}" for i in range(1, len(s))]
        ok = lambda a, b: len(a) == len(b) == 3 and a[0] == b[0]  # noqa: E731
        bad = [f"{n}: student {a} vs teacher {b}" for n, a, b in zip(names, s, t) if not ok(a, b)]
        if len(s) < 2 or len(s) != len(t):
            bad.append(f"student {len(s)} vs teacher {len(t)} layers")
        if bad:
            raise MethodError(f"fsp: student {student.arch} and teacher {teacher.arch} need C x H x W maps with "
                              f"equal channel counts at every layer of [stem, *stages]: {'; '.join(bad)}")

    def init_stage(self) -> InitStage | None:
        epochs = self.options.init_epochs
        return InitStage(epochs, (), True, self.init_teacher_fields) if epochs else None

    def init_loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> torch.Tensor:
        assert student is not None and teacher is not None
        with torch.autocast(device_type=student.logits.device.type, enabled=False):
            g_s = fsp_matrices([full_precision(f) for f in [student.stem, *student.stages]])
            g_t = fsp_matrices([full_precision(f.detach()) for f in [teacher.stem, *teacher.stages]])
            losses = [(s - t).pow(2).mean() for s, t in zip(g_s, g_t)]
            return torch.stack(losses).sum()

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> torch.Tensor:
        return torch.zeros((), dtype=full_precision(student.logits).dtype, device=student.logits.device)


register_method(MethodSpec("fsp", term="fsp", uses_teacher=True, default_weights=(1.0, 0.0, 50.0)))
