"""Cross-entropy on the labels: the `gamma` term."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipelines.batch import Batch
from rrd_fast.methods.base import LossTerm, register_term
from rrd_fast.models import ModelOutput


@register_term
class CrossEntropy(LossTerm):
    name = "ce"

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(student.logits.float(), batch.labels)
