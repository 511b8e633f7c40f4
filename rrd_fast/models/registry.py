"""Model registry: one decorator per architecture, looked up by name from configs."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from pipelines.errors import did_you_mean


@dataclass
class ModelOutput:
    """Everything a distillation method may read from one forward pass.

    `stages` are the post-activation outputs of each stage, `pre_relu` the same
    outputs before their final ReLU (used by AB); `pooled` is the penultimate vector.
    """

    logits: torch.Tensor
    pooled: torch.Tensor
    stages: list[torch.Tensor] = field(default_factory=list)
    pre_relu: list[torch.Tensor] = field(default_factory=list)


ModelFactory = Callable[..., nn.Module]
_MODELS: dict[str, ModelFactory] = {}


class UnknownModelError(ValueError):
    pass


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Register `fn(num_classes: int, in_channels: int) -> nn.Module` under `name`."""

    def wrap(fn: ModelFactory) -> ModelFactory:
        if name in _MODELS:
            raise ValueError(f"model {name!r} registered twice")
        _MODELS[name] = fn
        return fn

    return wrap


def list_models(pattern: str = "*") -> list[str]:
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def create_model(name: str, num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    if name not in _MODELS:
        hint = did_you_mean(name, _MODELS)
        raise UnknownModelError(f"unknown model {name!r}{hint} (known: {', '.join(list_models())})")
    return _MODELS[name](num_classes=num_classes, in_channels=in_channels)
