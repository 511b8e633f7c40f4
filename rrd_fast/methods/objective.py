"""Turns a method config into the weighted sum gamma*CE + alpha*KD + beta*term.

`method_terms` says which terms a method config builds, with their weights and options; the
objective and the teacher cache both ask it, so they cannot disagree. The method config is
any object with `name`, `gamma`, `alpha`, `beta` (None: the method's default) and `options`
(rrd_fast.config.MethodConfig), so this package needs nothing from the config module.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from pipelines.batch import Batch
from rrd_fast.methods.base import InitStage, LossTerm, MethodError, NetInfo, TermContext, get_method, get_term, parse_options
from rrd_fast.models import ModelOutput


class MethodSettings(Protocol):
    name: str
    gamma: float | None
    alpha: float | None
    beta: float | None
    options: dict[str, dict[str, Any]]


def resolve_weights(cfg: MethodSettings) -> tuple[float, float, float]:
    """(gamma, alpha, beta): the user's where set, else the authors' weights for the method."""
    defaults = get_method(cfg.name).default_weights
    given = (cfg.gamma, cfg.alpha, cfg.beta)
    return tuple(float(d if w is None else w) for w, d in zip(given, defaults))  # type: ignore[return-value]


def method_terms(cfg: MethodSettings) -> dict[str, tuple[float, type[LossTerm], Any]]:
    """Term name -> (weight, class, parsed options) for every term with a non-zero weight."""
    spec = get_method(cfg.name)
    gamma, alpha, beta = resolve_weights(cfg)
    wanted: dict[str, float] = {"ce": gamma, "kd": alpha}
    if spec.term is not None:
        wanted[spec.term] = beta
    elif beta != 0:
        raise MethodError(f"method.beta: method {cfg.name!r} has no term for beta to weigh; set beta=0")
    if not spec.uses_teacher and alpha != 0:
        raise MethodError(f"method.alpha: method {cfg.name!r} trains without a teacher; set alpha=0 or use method kd")
    unknown = set(cfg.options) - set(wanted)
    if unknown:
        raise MethodError(f"method.options: no term {sorted(unknown)} in method {cfg.name!r} (terms: {sorted(wanted)})")
    terms = {}
    for name, weight in wanted.items():
        if weight != 0:
            cls = get_term(name)
            terms[name] = (float(weight), cls, parse_options(cls, cfg.options.get(name)))
    if not terms:
        raise MethodError(f"method: all weights are zero for {cfg.name!r}; nothing to train")
    return terms


def teacher_fields_for(cfg: MethodSettings) -> tuple[str, ...]:
    """Every teacher output the method reads, in any stage: what a teacher cache must hold."""
    fields: list[str] = []
    for _, cls, options in method_terms(cfg).values():
        fields += [f for f in cls.teacher_fields_for(options) if f not in fields]
    return tuple(fields)


class Objective(nn.Module):
    """Named, weighted loss terms; terms with weight 0 are not built at all."""

    def __init__(self, cfg: MethodSettings, student: NetInfo, teacher: NetInfo | None, context: TermContext) -> None:
        super().__init__()
        terms = method_terms(cfg)
        self.weights = {name: weight for name, (weight, _, _) in terms.items()}
        self.uses_teacher = get_method(cfg.name).uses_teacher
        if self.uses_teacher and teacher is None:
            raise MethodError(f"teacher.arch: method {cfg.name!r} needs a teacher")
        self.terms = nn.ModuleDict()
        for name, (_, cls, options) in terms.items():
            self.terms[name] = cls(options, student, teacher if self.uses_teacher else None, context)

    @property
    def teacher_fields(self) -> tuple[str, ...]:
        """Teacher outputs the main stage reads; empty: the teacher need not run."""
        fields: list[str] = []
        for term in self.terms.values():
            fields += [f for f in term.teacher_fields if f not in fields]
        return tuple(fields)

    def init_stages(self) -> list[tuple[str, InitStage]]:
        return [(name, stage) for name, term in self.terms.items() if (stage := term.init_stage()) is not None]

    def start_epoch(self, epoch: int) -> None:
        for term in self.terms.values():
            term.start_epoch(epoch)

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        """Weighted terms by name; the trainer sums them."""
        return {name: self.weights[name] * term(student, teacher, batch) for name, term in self.terms.items()}
