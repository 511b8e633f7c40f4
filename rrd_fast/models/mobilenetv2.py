"""MobileNetV2 at width 0.5 with expansion 6 (RepDistiller's ``mobile_half``), for 32x32 inputs.

Names follow RepDistiller's ``models/mobilenetv2.py``: stem ``conv1.{0,1}`` (conv, BN),
``blocks.{g}.{i}.conv.{0..7}`` for each inverted residual (pw conv, BN, ReLU, dw conv,
BN, ReLU, pw-linear conv, BN), head ``conv2.{0,1}`` and ``classifier.0``.

Stages are the outputs of block groups 1, 2, 4 and 6 (the reference's ``is_feat``
points). Those outputs come from a linear bottleneck with no ReLU, so `pre_relu`
holds the same tensors, as the reference's ``preact`` does. The stem feature is the
output of ``conv1`` (after its ReLU).

``feature_modules`` is the reference's ``get_feat_modules()``: ``conv1`` and ``blocks``
only. The 1x1 head ``conv2`` (which makes the pooled vector) is left out, as there, so
AB's and FSP's init stage does not train it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rrd_fast.models.registry import ModelOutput, register_model

# (expansion, base output channels, repeats, first stride) per block group; the
# expansion of group 0 is always 1, the others use the model's expansion.
_SETTINGS: list[tuple[int | None, int, int, int]] = [
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
]
_STAGE_GROUPS = (1, 2, 4, 6)


class InvertedResidual(nn.Module):
    """Expand (1x1) - depthwise 3x3 - project (1x1, linear); identity shortcut when shapes allow."""

    def __init__(self, inp: int, oup: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = inp * expand
        self.use_residual = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """CIFAR MobileNetV2: stride-2 stem, seven inverted-residual groups, 1x1 head to 1280."""

    def __init__(
        self, expand: int = 6, width: float = 0.5, num_classes: int = 100, in_channels: int = 3
    ) -> None:
        super().__init__()
        channels = int(32 * width)
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.blocks = nn.ModuleList()
        group_out: list[int] = []
        for t, c, n, s in _SETTINGS:
            out = int(c * width)
            group = []
            for i in range(n):
                group.append(InvertedResidual(channels, out, s if i == 0 else 1, expand if t is None else t))
                channels = out
            self.blocks.append(nn.Sequential(*group))
            group_out.append(out)
        # The reference widens the head only for width > 1.
        last = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = nn.Sequential(
            nn.Conv2d(channels, last, 1, bias=False),
            nn.BatchNorm2d(last),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        self.pooled_dim: int = last
        self.stage_channels: list[int] = [group_out[g] for g in _STAGE_GROUPS]
        self._init_weights()

    def _init_weights(self) -> None:
        """Reference init: He-normal (fan_out) convs, unit BN, N(0, 0.01) classifier."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, features: bool = False) -> torch.Tensor | ModelOutput:
        """Logits by default; with `features=True` a `ModelOutput` from the same single pass."""
        x = stem = self.conv1(x)
        stages: list[torch.Tensor] = []
        for g, group in enumerate(self.blocks):
            x = group(x)
            if g in _STAGE_GROUPS:
                stages.append(x)
        x = self.conv2(x)
        pooled = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        logits = self.classifier(pooled)
        if not features:
            return logits
        return ModelOutput(logits=logits, pooled=pooled, stages=stages, pre_relu=list(stages), stem=stem)

    def feature_modules(self) -> list[nn.Module]:
        """RepDistiller's get_feat_modules(): `conv1` and `blocks`; not `conv2` nor the classifier."""
        return [self.conv1, self.blocks]


@register_model("MobileNetV2")
def mobilenetv2_half(num_classes: int = 100, in_channels: int = 3) -> MobileNetV2:
    return MobileNetV2(expand=6, width=0.5, num_classes=num_classes, in_channels=in_channels)
