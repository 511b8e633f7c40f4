"""ShuffleNet v2 (1x: widths 116/232/464, head 1024) for CIFAR, as RepDistiller's ``ShuffleV2``.

Names follow RepDistiller's ``models/ShuffleNetv2.py``: stem ``conv1``/``bn1`` (1x1 conv, no
striding); per stage ``layer{k}.0`` is a down-sampling unit with ``conv1..conv5``/``bn1..bn5``
and ``layer{k}.{1..n}`` are split units with ``conv1..conv3``/``bn1..bn3``; then the head
``conv2``/``bn2`` and the classifier ``linear``. Weights use PyTorch's default init, as the
reference does for this family.

Features are the reference's ``is_feat`` list: the stem after its ReLU, the stage
outputs, the pooled vector. With ``preact`` the reference returns each stage's last unit
as ``cat([kept half, branch before its ReLU])`` *without* the channel shuffle that the
stage output gets; `pre_relu` reproduces that tensor exactly (a reference quirk: it is a
fixed channel permutation of the pre-activation of `stages[i]`, so
``channel_shuffle(relu(pre_relu[i]), 2) == stages[i]``).

``feature_modules`` is the reference's ``get_feat_modules()``: stem conv, BN and the
three stages; the head ``conv2``/``bn2`` is left out, as there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rrd_fast.models.registry import ModelOutput, register_model
from rrd_fast.models.resnet import run_stage

_STEM = 24


class SplitUnit(nn.Module):
    """Keep half the channels, run the other half through 1x1 - dw3x3 - 1x1, concatenate, shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.half = channels // 2
        c = self.half
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(kept half, branch output before its ReLU)."""
        keep, branch = x[:, : self.half], x[:, self.half :]
        out = F.relu(self.bn1(self.conv1(branch)), inplace=True)
        return keep, self.bn3(self.conv3(self.bn2(self.conv2(out))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep, pre = self._split(x)
        return F.channel_shuffle(torch.cat([keep, F.relu(pre, inplace=True)], 1), 2)

    def forward_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, the reference's preact: the unshuffled concatenation before the ReLU)."""
        keep, pre = self._split(x)
        return F.channel_shuffle(torch.cat([keep, F.relu(pre)], 1), 2), torch.cat([keep, pre], 1)


class DownUnit(nn.Module):
    """Two strided branches (dw3x3-1x1 and 1x1-dw3x3-1x1), concatenated and shuffled."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        c = in_channels
        self.conv1 = nn.Conv2d(c, c, 3, stride=2, padding=1, groups=c, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))), inplace=True)
        right = F.relu(self.bn3(self.conv3(x)), inplace=True)
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))), inplace=True)
        return F.channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(nn.Module):
    """Three stages (a down unit then `n` split units each), 1x1 head conv, global pool, linear."""

    def __init__(
        self,
        out_channels: tuple[int, int, int, int] = (116, 232, 464, 1024),
        num_blocks: tuple[int, int, int] = (3, 7, 3),
        num_classes: int = 100,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, _STEM, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(_STEM)
        prev = _STEM
        for idx, (c, n) in enumerate(zip(out_channels[:3], num_blocks), start=1):
            units = [DownUnit(prev, c)] + [SplitUnit(c) for _ in range(n)]
            self.add_module(f"layer{idx}", nn.Sequential(*units))
            prev = c
        self.conv2 = nn.Conv2d(prev, out_channels[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)
        self.pooled_dim: int = out_channels[3]
        self.stage_channels: list[int] = list(out_channels[:3])

    def forward(self, x: torch.Tensor, features: bool = False) -> torch.Tensor | ModelOutput:
        """Logits by default; with `features=True` a `ModelOutput` from the same single pass."""
        stem = F.relu(self.bn1(self.conv1(x)), inplace=True)
        s1, p1 = run_stage(self.layer1, stem, features)
        s2, p2 = run_stage(self.layer2, s1, features)
        s3, p3 = run_stage(self.layer3, s2, features)
        x = F.relu(self.bn2(self.conv2(s3)), inplace=True)
        pooled = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        logits = self.linear(pooled)
        if not features:
            return logits
        return ModelOutput(logits=logits, pooled=pooled, stages=[s1, s2, s3], pre_relu=[p1, p2, p3], stem=stem)

    def feature_modules(self) -> list[nn.Module]:
        """RepDistiller's get_feat_modules(): stem conv, BN and stages; not the head nor `linear`."""
        return [self.conv1, self.bn1, self.layer1, self.layer2, self.layer3]


@register_model("ShuffleV2")
def shufflev2(num_classes: int = 100, in_channels: int = 3) -> ShuffleNetV2:
    return ShuffleNetV2(num_classes=num_classes, in_channels=in_channels)
