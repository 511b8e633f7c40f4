"""Model registry: one decorator per architecture, looked up by name from configs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from pipelines.errors import UserError
from pipelines.registry import Registry


@dataclass
class ModelOutput:
    """Everything a distillation method may read from one forward pass.

    The fields are RepDistiller's `model(x, is_feat=True, preact=...)` list, by name:
    `stem` is feat[0], `stages` are feat[1:-1] (each stage's post-activation output),
    `pre_relu` the same outputs before their final ReLU (preact=True, used by AB), and
    `pooled` is feat[-1], the penultimate vector. Every family also has
    `feature_modules()`, the reference's `get_feat_modules()` (what AB's and FSP's init
    stage trains).
    """

    logits: torch.Tensor
    pooled: torch.Tensor
    stages: list[torch.Tensor] = field(default_factory=list)
    pre_relu: list[torch.Tensor] = field(default_factory=list)
    stem: torch.Tensor | None = None

    def feats(self, preact: bool = False) -> list[torch.Tensor]:
        """RepDistiller's feature list: [stem, *stages, pooled] (stages before their last ReLU with `preact`)."""
        if self.stem is None:
            raise ValueError("this ModelOutput has no stem feature")
        return [self.stem, *(self.pre_relu if preact else self.stages), self.pooled]


ModelFactory = Callable[..., nn.Module]


class UnknownModelError(UserError):
    pass


MODELS: Registry[ModelFactory] = Registry("model", error=UnknownModelError)


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Register `fn(num_classes: int, in_channels: int) -> nn.Module` under `name`."""
    return MODELS.register(name=name)


def list_models(pattern: str = "*") -> list[str]:
    return MODELS.names(pattern)


def create_model(name: str, num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    return MODELS.get(name)(num_classes=num_classes, in_channels=in_channels)


def feat_shapes(model: nn.Module, in_channels: int, image_size: int) -> tuple[tuple[int, ...], ...]:
    """Per-sample shapes of `model`'s feature list (ModelOutput.feats()) at this input size.

    One dummy forward in eval mode, as the reference measures shapes before building its heads;
    the model's training mode is restored afterwards.
    """
    was_training = model.training
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, in_channels, image_size, image_size, device=device, dtype=dtype), features=True)
    finally:
        model.train(was_training)
    return tuple(tuple(int(d) for d in t.shape[1:]) for t in out.feats())
