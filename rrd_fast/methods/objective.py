"""Turns a method config into the weighted sum gamma*CE + alpha*KD + beta*term."""

from __future__ import annotations

import torch
from torch import nn

from pipelines.batch import Batch
from rrd_fast.config import MethodConfig
from rrd_fast.methods.base import MethodError, NetInfo, TermContext, get_method, get_term, parse_options
from rrd_fast.models import ModelOutput


class Objective(nn.Module):
    """Named, weighted loss terms; terms with weight 0 are not built at all."""

    def __init__(self, cfg: MethodConfig, student: NetInfo, teacher: NetInfo | None, context: TermContext) -> None:
        super().__init__()
        spec = get_method(cfg.name)
        wanted: dict[str, float] = {"ce": cfg.gamma, "kd": cfg.alpha}
        if spec.term is not None:
            wanted[spec.term] = cfg.beta
        elif cfg.beta != 0:
            raise MethodError(f"method.beta: method {cfg.name!r} has no term for beta to weigh; set beta=0")
        if not spec.uses_teacher and cfg.alpha != 0:
            raise MethodError(f"method.alpha: method {cfg.name!r} trains without a teacher; set alpha=0 or use method kd")
        unknown = set(cfg.options) - set(wanted)
        if unknown:
            raise MethodError(f"method.options: no term {sorted(unknown)} in method {cfg.name!r} (terms: {sorted(wanted)})")
        self.weights = {name: float(w) for name, w in wanted.items() if w != 0}
        if not self.weights:
            raise MethodError(f"method: all weights are zero for {cfg.name!r}; nothing to train")
        self.uses_teacher = spec.uses_teacher
        if self.uses_teacher and teacher is None:
            raise MethodError(f"teacher.arch: method {cfg.name!r} needs a teacher")
        self.terms = nn.ModuleDict()
        for name in self.weights:
            cls = get_term(name)
            self.terms[name] = cls(parse_options(cls, cfg.options.get(name)), student, teacher if spec.uses_teacher else None, context)

    @property
    def teacher_fields(self) -> tuple[str, ...]:
        fields: list[str] = []
        for term in self.terms.values():
            fields += [f for f in term.teacher_fields if f not in fields]
        return tuple(fields)

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        """Weighted terms by name; the trainer sums them."""
        return {name: self.weights[name] * term(student, teacher, batch) for name, term in self.terms.items()}
