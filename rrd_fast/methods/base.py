"""The contract between the trainer and distillation methods.

A loss term is a small module: it declares what it reads from the teacher and the
batch, owns any trainable heads it needs, and maps (student output, teacher output,
batch) to one scalar. The trainer only sums weighted terms; it knows no method names.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.batch import Batch
from pipelines.errors import UserError, did_you_mean
from pipelines.registry import Registry
from rrd_fast.models import ModelOutput


class MethodError(UserError):
    """A method that cannot be built for this config or student/teacher pair."""


@dataclass(frozen=True)
class NetInfo:
    """What a method may know about a network without running it.

    `feat_shapes` are the per-sample shapes of RepDistiller's feature list for this
    dataset's image size (`ModelOutput.feats()`: stem, stages..., pooled), as the
    reference measures them with one dummy forward pass before building its heads.
    """

    arch: str
    num_classes: int
    pooled_dim: int
    stage_channels: tuple[int, ...]
    feat_shapes: tuple[tuple[int, ...], ...] = ()


def full_precision(t: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32; fp32 and fp64 unchanged (losses are pinned against the reference in fp64)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def pool_to_smaller(f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RepDistiller's AT/NST/VID/FT rule for maps of different heights: average-pool the larger to a
    square of the smaller height (widths are not consulted, as in the reference)."""
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        return F.adaptive_avg_pool2d(f_s, (t_h, t_h)), f_t
    if s_h < t_h:
        return f_s, F.adaptive_avg_pool2d(f_t, (s_h, s_h))
    return f_s, f_t


def check_stage_pairs(method: str, student: "NetInfo", teacher: "NetInfo") -> None:
    """Refuse, before training, stage pairs the reference crashes on: no C x H x W maps, or equal heights
    with unequal widths."""
    s, t = student.feat_shapes[1:-1], teacher.feat_shapes[1:-1]
    bad = lambda a, b: len(a) != 3 or len(b) != 3 or (a[1] == b[1] and a[2] != b[2])  # noqa: E731
    if not s or not t or any(map(bad, s, t)):
        raise MethodError(f"{method}: cannot pair student {student.arch} stages {list(s)} with teacher {teacher.arch} "
                          f"stages {list(t)} (need C x H x W maps, equal widths at equal heights)")


@dataclass(frozen=True)
class InitStage:
    """A stage run before the main training, as RepDistiller's `helper/pretrain.py` (AB, FT, FSP).

    The trainer runs `epochs` epochs of `LossTerm.init_loss` with a fresh SGD over `modules`
    (and the student's feature modules when `student_features`), at a fixed `lr` (None: optim.lr),
    with the run's momentum and weight decay. The student is put in eval mode and the trained
    modules in train mode, as the reference does. Parameters trained here need not require grad
    in the main stage: the trainer enables them for this stage only.
    """

    epochs: int
    modules: tuple[nn.Module, ...]
    student_features: bool
    teacher_fields: tuple[str, ...]
    lr: float | None = None


@dataclass(frozen=True)
class TermContext:
    """Run-level facts a term may need: dataset size and labels (for index memories), the seed,
    and how many processes share the run and how memories are split across them."""

    num_train_samples: int
    seed: int
    world_size: int = 1
    memory_sharding: str = "local"
    train_labels: Any = field(default=None, compare=False)  # N training labels (numpy), for class-aware sampling


class LossTerm(nn.Module):
    """Base class of one weighted loss term.

    Subclasses set `name`, `Options` (a dataclass of their settings), and the teacher
    fields they read in the main stage (`teacher_fields`, from ModelOutput: logits, pooled,
    stem, stages, pre_relu; an instance may narrow them in `__init__`). Parameters that
    require grad are trained with the student; others stay fixed. A term with a warm-up
    stage returns it from `init_stage()` and computes its loss in `init_loss`.
    """

    name: ClassVar[str]
    Options: ClassVar[type] = type("NoOptions", (), {})
    teacher_fields: tuple[str, ...] = ()
    init_teacher_fields: ClassVar[tuple[str, ...]] = ()  # what the init stage reads, if the term has one

    @classmethod
    def teacher_fields_for(cls, options: Any) -> tuple[str, ...]:
        """Teacher outputs read in any stage with these options, known before building (the cache needs them)."""
        return tuple(dict.fromkeys(cls.teacher_fields + cls.init_teacher_fields))

    def __init__(self, options: Any, student: NetInfo, teacher: NetInfo | None, context: TermContext) -> None:
        super().__init__()
        self.options = options

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def start_epoch(self, epoch: int) -> None:
        """Called before each main-stage epoch (0-based), for schedules such as DKD's warm-up."""

    def init_stage(self) -> InitStage | None:
        return None

    def init_loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} has no init stage")


TERMS: Registry[type[LossTerm]] = Registry("loss term", error=MethodError)
register_term = TERMS.register
get_term = TERMS.get


def list_terms() -> list[str]:
    return TERMS.names()


@dataclass(frozen=True)
class MethodSpec:
    """A user-facing method: which term `beta` weighs (None: only CE/KD) and whether it needs a teacher."""

    name: str
    term: str | None
    uses_teacher: bool
    default_weights: tuple[float, float, float]  # gamma, alpha, beta as in the authors' commands


METHODS: Registry[MethodSpec] = Registry("method", setting="method.name", error=MethodError)
register_method = METHODS.register
get_method = METHODS.get


def list_methods(pattern: str = "*") -> list[str]:
    return METHODS.names(pattern)


def parse_options(term: type[LossTerm], raw: dict[str, Any] | None) -> Any:
    """Build a term's options dataclass from a plain dict, refusing unknown keys by name."""
    raw = dict(raw or {})
    if not dataclasses.is_dataclass(term.Options):
        if raw:
            raise MethodError(f"method.options.{term.name}: this term takes no options, got {sorted(raw)}")
        return None
    hints = typing.get_type_hints(term.Options)
    names = [f.name for f in dataclasses.fields(term.Options)]
    for key, value in raw.items():
        if key not in names:
            hint = did_you_mean(key, names)
            raise MethodError(f"unknown config key 'method.options.{term.name}.{key}'{hint}")
        allowed = typing.get_args(hints[key]) if typing.get_origin(hints[key]) is typing.Literal else None
        if allowed and value not in allowed:
            raise MethodError(f"method.options.{term.name}.{key}: {value!r} is not one of {allowed}")
    return term.Options(**raw)
