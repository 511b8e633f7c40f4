"""VGG with BatchNorm for CIFAR (vgg8, vgg11, vgg13, vgg16, vgg19; RepDistiller's ``vggN_bn``).

Names follow RepDistiller's ``models/vgg.py``: five ``block{0..4}`` Sequentials laid out
as conv(bias)-BN-ReLU-conv-BN-...-BN (the trailing ReLU removed, so indices are
``block{k}.{3j}`` for convs and ``block{k}.{3j+1}`` for BNs) and the classifier
``classifier``. There are no hidden FC layers.

Features are the reference's ``is_feat`` list: the stem is block0 after its ReLU (before
the first pool), the stages are the outputs of block1..block4 (`pre_relu` the same before
the ReLU that follows each block), then the pooled vector.

``feature_modules`` is the reference's ``get_feat_modules()``: the five blocks, each
followed by its pool (``pool0..pool3`` max-pools, ``pool4`` the global average pool).
The pools are parameter-free modules kept only so that list is the same.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rrd_fast.models.registry import ModelOutput, register_model

# Per-block conv widths; each block is followed by a 2x2 max-pool except the last
# (and the fourth, on 32x32 inputs).
_CONFIGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _make_block(widths: list[int], in_channels: int) -> nn.Sequential:
    """conv-BN(-ReLU-conv-BN)*: the block ends at a BN so the caller sees its pre-ReLU output."""
    mods: list[nn.Module] = []
    for i, w in enumerate(widths):
        if i:
            mods.append(nn.ReLU(inplace=True))
        mods += [nn.Conv2d(in_channels, w, 3, padding=1), nn.BatchNorm2d(w)]
        in_channels = w
    return nn.Sequential(*mods)


class VGG(nn.Module):
    """Five conv blocks, global average pool, one linear classifier."""

    def __init__(self, cfg: list[list[int]], num_classes: int = 100, in_channels: int = 3) -> None:
        super().__init__()
        prev = in_channels
        for k, widths in enumerate(cfg):
            self.add_module(f"block{k}", _make_block(widths, prev))
            prev = widths[-1]
        for k in range(4):
            self.add_module(f"pool{k}", nn.MaxPool2d(2, 2))
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(prev, num_classes)
        self.pooled_dim: int = prev
        self.stage_channels: list[int] = [widths[-1] for widths in cfg[1:]]
        self._init_weights()

    def _init_weights(self) -> None:
        """Reference init: He-normal (fan_out) convs with zero bias, unit BN, N(0, 0.01) classifier."""
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
        """Logits by default; with `features=True` a `ModelOutput` from the same single pass.

        As in the reference, the pool after block3 is applied only to 64x64 inputs
        (a static shape test, so tracing specialises on it).
        """
        pool_after_block3 = x.shape[2] == 64
        inplace = not features  # the pre-ReLU block outputs survive only when they are returned
        stem = F.relu(self.block0(x), inplace=True)
        p1 = self.block1(self.pool0(stem))
        s1 = F.relu(p1, inplace=inplace)
        p2 = self.block2(self.pool1(s1))
        s2 = F.relu(p2, inplace=inplace)
        p3 = self.block3(self.pool2(s2))
        s3 = F.relu(p3, inplace=inplace)
        p4 = self.block4(self.pool3(s3) if pool_after_block3 else s3)
        s4 = F.relu(p4, inplace=inplace)
        pooled = torch.flatten(self.pool4(s4), 1)
        logits = self.classifier(pooled)
        if not features:
            return logits
        return ModelOutput(logits=logits, pooled=pooled, stages=[s1, s2, s3, s4], pre_relu=[p1, p2, p3, p4],
                           stem=stem)

    def feature_modules(self) -> list[nn.Module]:
        """RepDistiller's get_feat_modules(): blocks and pools in forward order, not the classifier."""
        return [m for k in range(5) for m in (getattr(self, f"block{k}"), getattr(self, f"pool{k}"))]


@register_model("vgg8")
def vgg8(num_classes: int = 100, in_channels: int = 3) -> VGG:
    return VGG(_CONFIGS["vgg8"], num_classes, in_channels)


@register_model("vgg11")
def vgg11(num_classes: int = 100, in_channels: int = 3) -> VGG:
    return VGG(_CONFIGS["vgg11"], num_classes, in_channels)


@register_model("vgg13")
def vgg13(num_classes: int = 100, in_channels: int = 3) -> VGG:
    return VGG(_CONFIGS["vgg13"], num_classes, in_channels)


@register_model("vgg16")
def vgg16(num_classes: int = 100, in_channels: int = 3) -> VGG:
    return VGG(_CONFIGS["vgg16"], num_classes, in_channels)


@register_model("vgg19")
def vgg19(num_classes: int = 100, in_channels: int = 3) -> VGG:
    return VGG(_CONFIGS["vgg19"], num_classes, in_channels)
