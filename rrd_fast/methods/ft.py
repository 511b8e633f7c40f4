"""FT: factor transfer (Kim et al., NeurIPS 2018), as RepDistiller runs it.

Init stage: a paraphraser (conv auto-encoder) learns to reconstruct the teacher's last
stage output (MSE); the student is not used (the reference runs it in eval mode, which
changes nothing). Main stage: a translator maps the student's last stage output to factors
matched against the paraphraser's teacher factors (L1 between L2-normalised channel-mean
maps of `f^p1`). The paraphraser is then fixed: it is not in the main optimizer.

Reproduced quirks: the init stage uses lr 0.01 for the ResNet/WRN students listed in
helper/pretrain.py, else the run's lr. In the main stage loops.py puts the paraphraser
in eval mode (`module_list[2].eval()`); `train()` here does the same. With the
reference's `use_bn=False` paraphraser that has no numerical effect.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.batch import Batch
from rrd_fast.methods.base import (InitStage, LossTerm, MethodError, MethodSpec, NetInfo, TermContext, full_precision,
                                   pool_to_smaller, register_method, register_term)
from rrd_fast.models import ModelOutput

_LR_001_STUDENTS = {"resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4",
                    "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2"}


@dataclass(frozen=True)
class FTOptions:
    """Reference defaults: Paraphraser(k=.5, use_bn=False), Translator(k=.5, use_bn=True), FactorTransfer(2, 1)."""

    init_epochs: int = 30
    k: float = 0.5  # factor rate: factors have int(k * teacher channels) channels
    p1: float = 2
    p2: float = 1
    paraphraser_bn: bool = False
    translator_bn: bool = True


def _stack(conv: type[nn.Module], widths: list[tuple[int, int]], bn: bool) -> nn.Sequential:
    """conv3x3, BN (or a keyless placeholder), LeakyReLU(0.1) per width: keys at 0/1, 3/4, 6/7 as models/util.py."""
    layers: list[nn.Module] = []
    for c_in, c_out in widths:
        layers += [conv(c_in, c_out, 3, 1, 1), nn.BatchNorm2d(c_out) if bn else nn.Identity(), nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers)


class FactorNet(nn.Module):
    """models/util.py Translator (`encoder`) or, with a decoder, Paraphraser (`encoder`, `decoder`)."""

    def __init__(self, c_in: int, c_factor: int, bn: bool, decoder: bool) -> None:
        super().__init__()
        self.encoder = _stack(nn.Conv2d, [(c_in, c_in), (c_in, c_factor), (c_factor, c_factor)], bn)
        if decoder:
            self.decoder = _stack(nn.ConvTranspose2d, [(c_factor, c_factor), (c_factor, c_in), (c_in, c_in)], bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


def factor_transfer(f_s: torch.Tensor, f_t: torch.Tensor, p1: float, p2: float) -> torch.Tensor:
    """distiller_zoo/FT.py: the larger map is average-pooled to the smaller (square) size first."""
    f_s, f_t = pool_to_smaller(f_s, f_t)
    diff = F.normalize(f_s.pow(p1).mean(1).flatten(1)) - F.normalize(f_t.pow(p1).mean(1).flatten(1))
    return diff.abs().mean() if p2 == 1 else diff.pow(p2).mean()


@register_term
class FT(LossTerm):
    name = "ft"
    Options = FTOptions
    teacher_fields = ("stages",)
    init_teacher_fields = ("stages",)

    def __init__(self, options: FTOptions, student: NetInfo, teacher: NetInfo | None, context: TermContext) -> None:
        super().__init__(options, student, teacher, context)
        assert teacher is not None
        if options.init_epochs < 0:
            raise MethodError(f"method.options.ft.init_epochs: must be >= 0, got {options.init_epochs}")
        if len(student.feat_shapes) < 3 or len(teacher.feat_shapes) < 3:
            raise MethodError(f"ft: no stage shapes for student {student.arch} or teacher {teacher.arch}")
        s_c, t_c = student.feat_shapes[-2][0], teacher.feat_shapes[-2][0]
        self.paraphraser = FactorNet(t_c, int(t_c * options.k), options.paraphraser_bn, decoder=True)
        self.paraphraser.requires_grad_(False)  # trained in the init stage only (the trainer enables it)
        self.translator = FactorNet(s_c, int(t_c * options.k), options.translator_bn, decoder=False)
        self.init_lr = 0.01 if student.arch in _LR_001_STUDENTS else None

    def train(self, mode: bool = True) -> FT:
        super().train(mode)
        self.paraphraser.eval()  # loops.py, every main-stage epoch; the init stage sets it to train itself
        return self

    def init_stage(self) -> InitStage | None:
        return InitStage(self.options.init_epochs, (self.paraphraser,), False, self.init_teacher_fields, self.init_lr) \
            if self.options.init_epochs else None

    def init_loss(self, student: ModelOutput | None, teacher: ModelOutput | None, batch: Batch) -> torch.Tensor:
        assert teacher is not None
        f_t = full_precision(teacher.stages[-1].detach())
        with torch.autocast(device_type=f_t.device.type, enabled=False):
            return F.mse_loss(self.paraphraser.decoder(self.paraphraser(f_t)), f_t)

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> torch.Tensor:
        assert teacher is not None
        f_s, f_t = full_precision(student.stages[-1]), full_precision(teacher.stages[-1].detach())
        with torch.autocast(device_type=f_s.device.type, enabled=False):
            return factor_transfer(self.translator(f_s), self.paraphraser(f_t), self.options.p1, self.options.p2)


register_method(MethodSpec("ft", term="ft", uses_teacher=True, default_weights=(1.0, 0.0, 200.0)))
