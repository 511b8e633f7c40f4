"""Wide ResNets (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2), pre-activation style.

Names follow RepDistiller's ``models/wrn.py``: stem ``conv1`` (no BN after it),
``block{1,2,3}.layer.{i}.{bn1,conv1,bn2,conv2}``, a 1x1 ``convShortcut`` where the
width changes, the final ``bn1`` and the classifier ``fc``.

Feature contract (as RepDistiller's ``is_feat`` / ``preact``): the stage outputs are
the raw residual sums leaving each group (a pre-activation net has no ReLU at the end
of a group), and `pre_relu[i]` is the BatchNorm that opens the next group (the final
``bn1`` for the last one), i.e. the tensor the next ReLU sees. Unlike the reference,
that BatchNorm is run once and shared with the next group, so running statistics are
updated once per step. The stem feature is the raw stem conv output (no BN follows it).

``feature_modules`` is the reference's ``get_feat_modules()``: ``conv1`` and the three
groups. It leaves out the final ``bn1`` (a reference quirk we keep): that BN makes the
last pre-ReLU feature, yet AB's and FSP's init stage does not train it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rrd_fast.models.registry import ModelOutput, register_model
from rrd_fast.models.resnet import kaiming_init_


class WideBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 with identity or 1x1 shortcut.

    When the width changes, the shortcut takes the activated input (as in the
    reference); otherwise it takes the raw input.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, padding=1, bias=False)
        self.convShortcut: nn.Conv2d | None = None
        if in_planes != out_planes:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)
        elif stride != 1:
            raise ValueError("a strided WideBlock needs a width change (the reference has no such block)")

    def from_activated(self, x: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """Block output given the raw input `x` and `act = relu(bn1(x))` computed by the caller."""
        out = self.conv1(act)
        out = self.conv2(F.relu(self.bn2(out), inplace=True))
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return out + shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_activated(x, F.relu(self.bn1(x), inplace=True))


class WideGroup(nn.Module):
    """A group of `WideBlock`s; the attribute name `layer` matches the reference checkpoints."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        blocks = [WideBlock(in_planes, out_planes, stride)]
        blocks += [WideBlock(out_planes, out_planes, 1) for _ in range(n - 1)]
        self.layer = nn.Sequential(*blocks)

    def from_activated(self, x: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """Run the group when the first block's `relu(bn1(x))` is already known."""
        first, *rest = self.layer
        x = first.from_activated(x, act)
        for block in rest:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-k for 32x32 inputs: depth = 6n+4, widths 16, 16k, 32k, 64k."""

    def __init__(self, depth: int, widen: int, num_classes: int = 100, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.block1 = WideGroup(n, widths[0], widths[1], 1)
        self.block2 = WideGroup(n, widths[1], widths[2], 2)
        self.block3 = WideGroup(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        self.pooled_dim: int = widths[3]
        self.stage_channels: list[int] = widths[1:]
        kaiming_init_(self)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor, features: bool = False) -> torch.Tensor | ModelOutput:
        """Logits by default; with `features=True` a `ModelOutput` from the same single pass."""
        stem = self.conv1(x)
        s1 = self.block1(stem)
        inplace = not features  # the pre-ReLU BN outputs survive only when they are returned
        p1 = self.block2.layer[0].bn1(s1)
        s2 = self.block2.from_activated(s1, F.relu(p1, inplace=inplace))
        p2 = self.block3.layer[0].bn1(s2)
        s3 = self.block3.from_activated(s2, F.relu(p2, inplace=inplace))
        p3 = self.bn1(s3)
        pooled = torch.flatten(F.adaptive_avg_pool2d(F.relu(p3, inplace=inplace), 1), 1)
        logits = self.fc(pooled)
        if not features:
            return logits
        return ModelOutput(logits=logits, pooled=pooled, stages=[s1, s2, s3], pre_relu=[p1, p2, p3], stem=stem)

    def feature_modules(self) -> list[nn.Module]:
        """RepDistiller's get_feat_modules(): stem conv and the groups, not `bn1` nor `fc`."""
        return [self.conv1, self.block1, self.block2, self.block3]


@register_model("wrn_16_1")
def wrn_16_1(num_classes: int = 100, in_channels: int = 3) -> WideResNet:
    return WideResNet(16, 1, num_classes, in_channels)


@register_model("wrn_16_2")
def wrn_16_2(num_classes: int = 100, in_channels: int = 3) -> WideResNet:
    return WideResNet(16, 2, num_classes, in_channels)


@register_model("wrn_40_1")
def wrn_40_1(num_classes: int = 100, in_channels: int = 3) -> WideResNet:
    return WideResNet(40, 1, num_classes, in_channels)


@register_model("wrn_40_2")
def wrn_40_2(num_classes: int = 100, in_channels: int = 3) -> WideResNet:
    return WideResNet(40, 2, num_classes, in_channels)
