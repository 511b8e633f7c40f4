"""CIFAR ResNets (resnet8 ... resnet110, resnet8x4, resnet32x4).

Module and parameter names follow RepDistiller's ``models/resnet.py`` so that
its ``ckpt_epoch_240.pth`` files load with ``strict=True``: ``conv1``/``bn1``
stem, ``layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2}``, projection shortcuts under
``layer{k}.0.downsample.{0,1}`` and the classifier ``fc``.

Features are the reference's ``is_feat`` list: the stem after its ReLU, each stage's
output (before its last ReLU with ``preact``), the pooled vector. ``feature_modules``
is its ``get_feat_modules()``: stem conv, BN, ReLU and the three stages.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rrd_fast.models.registry import ModelOutput, register_model


def kaiming_init_(model: nn.Module) -> None:
    """He-normal (fan_out) convs and unit BatchNorm, as the reference trained its teachers with."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class PreactBlock(nn.Module):
    """A block whose output is `relu(preact(x))`; `forward_pre` also returns `preact(x)`.

    The reference's last block of each stage returns (out, preact); this gives the same
    pair without a second pass.
    """

    def preact(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.preact(x), inplace=True)

    def forward_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, output before its ReLU); the ReLU is out of place so both survive."""
        pre = self.preact(x)
        return F.relu(pre), pre


class BasicBlock(PreactBlock):
    """Post-activation 3x3/3x3 residual block."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def preact(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


def run_stage(stage: nn.Sequential, x: torch.Tensor, keep_pre: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run a stage; return (output, the last block's pre-activation output or None).

    Blocks expose `forward_pre`. Without `keep_pre` the stage runs plainly (in-place
    ReLUs, no extra tensor kept), which is the logits-only path.
    """
    if not keep_pre:
        return stage(x), None
    *body, last = stage
    for block in body:
        x = block(x)
    return last.forward_pre(x)


class CifarResNet(nn.Module):
    """Three-stage CIFAR ResNet with depth 6n+2 and widths `widths` (stem, stage1..3)."""

    def __init__(self, depth: int, widths: list[int], num_classes: int = 100, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)  # a module only because get_feat_modules() lists it
        in_planes = widths[0]
        for idx, (planes, stride) in enumerate(zip(widths[1:], (1, 2, 2)), start=1):
            blocks = [BasicBlock(in_planes, planes, stride)]
            blocks += [BasicBlock(planes, planes) for _ in range(n - 1)]
            self.add_module(f"layer{idx}", nn.Sequential(*blocks))
            in_planes = planes
        self.fc = nn.Linear(widths[3], num_classes)
        self.pooled_dim: int = widths[3]
        self.stage_channels: list[int] = list(widths[1:])
        kaiming_init_(self)

    def forward(self, x: torch.Tensor, features: bool = False) -> torch.Tensor | ModelOutput:
        """Logits by default; with `features=True` a `ModelOutput` from the same single pass."""
        stem = self.relu(self.bn1(self.conv1(x)))
        s1, p1 = run_stage(self.layer1, stem, features)
        s2, p2 = run_stage(self.layer2, s1, features)
        s3, p3 = run_stage(self.layer3, s2, features)
        pooled = torch.flatten(F.adaptive_avg_pool2d(s3, 1), 1)
        logits = self.fc(pooled)
        if not features:
            return logits
        return ModelOutput(logits=logits, pooled=pooled, stages=[s1, s2, s3], pre_relu=[p1, p2, p3], stem=stem)

    def feature_modules(self) -> list[nn.Module]:
        """RepDistiller's get_feat_modules(): what AB's and FSP's init stage trains (all but `fc`)."""
        return [self.conv1, self.bn1, self.relu, self.layer1, self.layer2, self.layer3]


_SMALL = [16, 16, 32, 64]
_X4 = [32, 64, 128, 256]


@register_model("resnet8")
def resnet8(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(8, _SMALL, num_classes, in_channels)


@register_model("resnet14")
def resnet14(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(14, _SMALL, num_classes, in_channels)


@register_model("resnet20")
def resnet20(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(20, _SMALL, num_classes, in_channels)


@register_model("resnet32")
def resnet32(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(32, _SMALL, num_classes, in_channels)


@register_model("resnet44")
def resnet44(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(44, _SMALL, num_classes, in_channels)


@register_model("resnet56")
def resnet56(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(56, _SMALL, num_classes, in_channels)


@register_model("resnet110")
def resnet110(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(110, _SMALL, num_classes, in_channels)


@register_model("resnet8x4")
def resnet8x4(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(8, _X4, num_classes, in_channels)


@register_model("resnet32x4")
def resnet32x4(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(32, _X4, num_classes, in_channels)
