"""Decoupled KD (Zhao et al., CVPR 2022), as mdistiller's distillers/DKD.py.

KD is split into TCKD, a binary KL over [p_target, 1 - p_target], and NCKD, the KL between the
distributions renormalised over the non-target classes; the term is (alpha*TCKD + beta*NCKD)
* T^2 / batch. mdistiller ramps it by min(epoch / warmup, 1) with its 1-based epoch; our trainer's
main-stage epoch e is 0-based, so the factor is min((e + 1) / warmup, 1): 1/20 in the first epoch,
1 from epoch 19 on. mdistiller masks the target with -1000 before a full softmax for NCKD; here the
target column is dropped, the same distribution without relying on exp(-1000) underflowing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipelines.batch import Batch
from rrd_fast.methods.base import (LossTerm, MethodError, MethodSpec, NetInfo, TermContext, full_precision, register_method,
                                   register_term)
from rrd_fast.models import ModelOutput

DEFAULT_BETA = 8.0  # mdistiller/engine/cfg.py CFG.DKD.BETA, used where a pair's yaml sets none
# (teacher, student) -> DKD.BETA of mdistiller configs/cifar100/dkd/<file> (file named per entry).
PAIR_BETA: dict[tuple[str, str], float] = {
    ("resnet110", "resnet32"): 2.0,  # res110_res32.yaml
    ("resnet56", "resnet20"): 2.0,  # res56_res20.yaml
    ("vgg13", "MobileNetV2"): 6.0,  # vgg13_mv2.yaml
    ("vgg13", "vgg8"): 6.0,  # vgg13_vgg8.yaml
    ("wrn_40_2", "wrn_16_2"): 6.0,  # wrn40_2_wrn_16_2.yaml
    ("wrn_40_2", "wrn_40_1"): 6.0,  # wrn40_2_wrn_40_1.yaml
    ("resnet32x4", "resnet8x4"): DEFAULT_BETA,  # res32x4_res8x4.yaml (no BETA: cfg.py's)
    ("resnet32x4", "ShuffleV1"): DEFAULT_BETA,  # res32x4_shuv1.yaml (no BETA)
    ("resnet32x4", "ShuffleV2"): DEFAULT_BETA,  # res32x4_shuv2.yaml (no BETA)
    ("ResNet50", "MobileNetV2"): DEFAULT_BETA,  # res50_mv2.yaml (no BETA)
    ("wrn_40_2", "ShuffleV1"): DEFAULT_BETA,  # wrn40_2_shuv1.yaml (no BETA)
}


@dataclass(frozen=True)
class DKDOptions:
    alpha: float = 1.0  # TCKD weight
    beta: float | None = None  # NCKD weight; None: PAIR_BETA's value for the pair, else DEFAULT_BETA
    T: float = 4.0
    warmup: int = 20  # epochs of linear ramp-up; 0: none


def _split(z: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log [p_target, p_other] (B×2) and the non-target logits (B×(C-1)), in class order.

    Gathered by index rather than by a boolean mask, so the shapes do not depend on the data.
    """
    cols = torch.arange(z.shape[1] - 1, device=z.device)[None, :]
    others = z.gather(1, cols + (cols >= target[:, None]))
    binary = torch.stack([z.gather(1, target[:, None]).squeeze(1), torch.logsumexp(others, dim=1)], dim=1)
    return binary - torch.logsumexp(z, dim=1, keepdim=True), others


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, alpha: float,
             beta: float, T: float) -> torch.Tensor:
    bin_s, other_s = _split(full_precision(student_logits) / T, target)
    bin_t, other_t = _split(full_precision(teacher_logits).detach() / T, target)
    tckd = F.kl_div(bin_s, bin_t.exp(), reduction="sum")
    nckd = F.kl_div(F.log_softmax(other_s, dim=1), F.softmax(other_t, dim=1), reduction="sum")
    return (alpha * tckd + beta * nckd) * (T * T) / target.shape[0]


@register_term
class DKD(LossTerm):
    name = "dkd"
    Options = DKDOptions
    teacher_fields = ("logits",)

    def __init__(self, options: DKDOptions, student: NetInfo, teacher: NetInfo | None, context: TermContext) -> None:
        super().__init__(options, student, teacher, context)
        assert teacher is not None
        if teacher.num_classes != student.num_classes:
            raise MethodError(f"dkd: student {student.arch} has {student.num_classes} classes but teacher "
                              f"{teacher.arch} has {teacher.num_classes}; DKD needs matching class counts")
        pair_beta = PAIR_BETA.get((teacher.arch, student.arch), DEFAULT_BETA)
        self.beta = options.beta if options.beta is not None else pair_beta
        self.epoch = 0
        # The factor the loss reads: a device tensor updated in place, so a compiled step does not
        # recompile when it changes (non-persistent: start_epoch sets it before every epoch). One
        # element, not 0-d: dynamo would trace a 0-d CPU tensor as a Python scalar and retrace.
        self.register_buffer("factor_tensor", torch.tensor([self.warmup_factor(0)], dtype=torch.float64),
                             persistent=False)

    @property
    def factor(self) -> float:
        return self.warmup_factor(self.epoch)

    def warmup_factor(self, epoch: int) -> float:
        """mdistiller's min(epoch / warmup, 1) at its 1-based epoch, i.e. our 0-based `epoch` + 1."""
        return min((epoch + 1) / self.options.warmup, 1.0) if self.options.warmup > 0 else 1.0

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.factor_tensor.fill_(self.warmup_factor(epoch))

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> torch.Tensor:
        assert teacher is not None
        o = self.options
        loss = dkd_loss(student.logits, teacher.logits, batch.labels, o.alpha, self.beta, o.T)
        return self.factor_tensor.to(loss.dtype)[0] * loss


register_method(MethodSpec("dkd", term="dkd", uses_teacher=True, default_weights=(1.0, 0.0, 1.0)))
