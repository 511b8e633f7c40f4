"""ResNet50 with a CIFAR stem (3x3 conv, no max-pool), as RepDistiller's ``models/resnetv2.py``.

Names follow that file: ``conv1``/``bn1`` stem, ``layer{1..4}.{i}.{conv1..3,bn1..3}``,
projection shortcuts under ``layer{k}.{i}.shortcut.{0,1}`` and the classifier ``linear``.
``feature_modules`` is the reference's ``get_feat_modules()``: stem conv, BN and the four
stages (it lists no ReLU module, unlike the CIFAR ResNet's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rrd_fast.models.registry import ModelOutput, register_model
from rrd_fast.models.resnet import PreactBlock, kaiming_init_, run_stage


class Bottleneck(PreactBlock):
    """1x1-3x3-1x1 residual block with 4x expansion; `preact` is the sum before the final ReLU."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut: nn.Sequential | None = None
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )

    def preact(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        return out + (x if self.shortcut is None else self.shortcut(x))


class ResNetV2(nn.Module):
    """Four-stage bottleneck ResNet for 32x32 inputs (stride 1 stem, strides 1/2/2/2)."""

    def __init__(self, num_blocks: list[int], num_classes: int = 100, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_planes = 64
        channels = []
        plan = zip((64, 128, 256, 512), num_blocks, (1, 2, 2, 2))
        for idx, (planes, n, stride) in enumerate(plan, start=1):
            blocks = []
            for i in range(n):
                blocks.append(Bottleneck(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes * Bottleneck.expansion
            self.add_module(f"layer{idx}", nn.Sequential(*blocks))
            channels.append(in_planes)
        self.linear = nn.Linear(in_planes, num_classes)
        self.pooled_dim: int = in_planes
        self.stage_channels: list[int] = channels
        kaiming_init_(self)

    def forward(self, x: torch.Tensor, features: bool = False) -> torch.Tensor | ModelOutput:
        """Logits by default; with `features=True` a `ModelOutput` from the same single pass."""
        stem = F.relu(self.bn1(self.conv1(x)), inplace=True)
        s1, p1 = run_stage(self.layer1, stem, features)
        s2, p2 = run_stage(self.layer2, s1, features)
        s3, p3 = run_stage(self.layer3, s2, features)
        s4, p4 = run_stage(self.layer4, s3, features)
        pooled = torch.flatten(F.adaptive_avg_pool2d(s4, 1), 1)
        logits = self.linear(pooled)
        if not features:
            return logits
        return ModelOutput(logits=logits, pooled=pooled, stages=[s1, s2, s3, s4], pre_relu=[p1, p2, p3, p4],
                           stem=stem)

    def feature_modules(self) -> list[nn.Module]:
        """RepDistiller's get_feat_modules(): what AB's and FSP's init stage trains (all but `linear`)."""
        return [self.conv1, self.bn1, self.layer1, self.layer2, self.layer3, self.layer4]


@register_model("ResNet50")
def resnet50(num_classes: int = 100, in_channels: int = 3) -> ResNetV2:
    return ResNetV2([3, 4, 6, 3], num_classes, in_channels)
