"""ShuffleNet v1 (groups 3, widths 240/480/960) for CIFAR, as RepDistiller's ``ShuffleV1``.

Names follow RepDistiller's ``models/ShuffleNetv1.py``: stem ``conv1``/``bn1`` (a 1x1 conv,
no striding), ``layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2,conv3,bn3}`` and the classifier
``linear``. Shuffles and the average-pool shortcut hold no parameters.

Behaviour kept from the reference because trained weights depend on it: the first
block after the 24-channel stem uses an ungrouped 1x1 conv (and so no shuffle), the
depthwise conv is followed by a ReLU, and each stage's first block halves the
resolution and concatenates an average-pooled shortcut. Weights use PyTorch's default
init, as the reference does for this family.

Features are the reference's ``is_feat`` list (stem after its ReLU, stage outputs or
their pre-ReLU values, pooled vector); ``feature_modules`` is its ``get_feat_modules()``:
stem conv, BN and the three stages.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rrd_fast.models.registry import ModelOutput, register_model
from rrd_fast.models.resnet import PreactBlock, run_stage

_STEM = 24


class ShuffleUnit(PreactBlock):
    """Grouped 1x1 - shuffle - depthwise 3x3 - grouped 1x1, then added to the input.

    A strided unit instead concatenates an average-pooled copy of the input.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int) -> None:
        super().__init__()
        mid = out_planes // 4
        self.stride = stride
        self.first_groups = 1 if in_planes == _STEM else groups
        self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)

    def preact(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        if self.first_groups > 1:
            out = F.channel_shuffle(out, self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            return torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], 1)
        return out + x


class ShuffleNetV1(nn.Module):
    """Three stages, each opened by a strided concatenating unit."""

    def __init__(
        self,
        out_planes: tuple[int, int, int] = (240, 480, 960),
        num_blocks: tuple[int, int, int] = (4, 8, 4),
        groups: int = 3,
        num_classes: int = 100,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, _STEM, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(_STEM)
        in_planes = _STEM
        for idx, (planes, n) in enumerate(zip(out_planes, num_blocks), start=1):
            units = []
            for i in range(n):
                # The strided unit only produces the channels the pooled shortcut does not bring.
                if i == 0:
                    units.append(ShuffleUnit(in_planes, planes - in_planes, 2, groups))
                else:
                    units.append(ShuffleUnit(planes, planes, 1, groups))
                in_planes = planes
            self.add_module(f"layer{idx}", nn.Sequential(*units))
        self.linear = nn.Linear(in_planes, num_classes)
        self.pooled_dim: int = in_planes
        self.stage_channels: list[int] = list(out_planes)

    def forward(self, x: torch.Tensor, features: bool = False) -> torch.Tensor | ModelOutput:
        """Logits by default; with `features=True` a `ModelOutput` from the same single pass."""
        stem = F.relu(self.bn1(self.conv1(x)), inplace=True)
        s1, p1 = run_stage(self.layer1, stem, features)
        s2, p2 = run_stage(self.layer2, s1, features)
        s3, p3 = run_stage(self.layer3, s2, features)
        pooled = torch.flatten(F.adaptive_avg_pool2d(s3, 1), 1)
        logits = self.linear(pooled)
        if not features:
            return logits
        return ModelOutput(logits=logits, pooled=pooled, stages=[s1, s2, s3], pre_relu=[p1, p2, p3], stem=stem)

    def feature_modules(self) -> list[nn.Module]:
        """RepDistiller's get_feat_modules(): what AB's and FSP's init stage trains (all but `linear`)."""
        return [self.conv1, self.bn1, self.layer1, self.layer2, self.layer3]


@register_model("ShuffleV1")
def shufflev1(num_classes: int = 100, in_channels: int = 3) -> ShuffleNetV1:
    return ShuffleNetV1(num_classes=num_classes, in_channels=in_channels)
