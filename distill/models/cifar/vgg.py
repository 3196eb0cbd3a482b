"""VGG with BatchNorm of the CRD benchmark (Tian et al., 2020), after Simonyan & Zisserman, 2015."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..registry import register
from ..staged import Chain, Head, StagedNet
from .weight_init import init_weights

# Output channels of the 3x3 convs of each of the five blocks.
CONFIGS = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def make_block(widths: list[int], in_channels: int) -> nn.Sequential:
    """conv-BN-ReLU repeated, without the last ReLU (the network applies it, so it can read the BN)."""
    layers = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers[:-1])


class PoolIfLarge(nn.Module):
    """2x2 max pooling only for maps of at least ``size`` pixels a side.

    The CRD code pools before ``block4`` only for 64x64 inputs (8x8 maps there), never for 32x32 ones
    (4x4 maps); this rule agrees on both and extends to any input size.
    """

    def __init__(self, size: int = 8):
        super().__init__()
        self.size = size

    def forward(self, x):
        return F.max_pool2d(x, 2) if min(x.shape[-2:]) >= self.size else x


class VGG(StagedNet):
    """Five conv blocks (``block0``..``block4``) split by 2x2 max pooling, one linear ``classifier``.

    Pre-activations: each block's output before the stage's final ReLU, i.e. its last BatchNorm's output.
    """

    defines_preacts = True

    def __init__(self, cfg: list[list[int]], num_classes: int = 100, in_chans: int = 3):
        super().__init__()
        for i, widths in enumerate(cfg):
            self.add_module(f"block{i}", make_block(widths, cfg[i - 1][-1] if i else in_chans))
        for i in range(3):
            self.add_module(f"pool{i}", nn.MaxPool2d(2, 2))
        self.classifier = nn.Linear(cfg[-1][-1], num_classes)
        init_weights(self, linear_std=0.01)

    @property
    def stem(self):
        return nn.Identity()

    @property
    def stages(self):
        relu = nn.ReLU(inplace=True)
        return [
            Chain(self.block0, relu),
            Chain(self.pool0, self.block1, relu),
            Chain(self.pool1, self.block2, relu),
            Chain(self.pool2, self.block3, relu),
            Chain(PoolIfLarge(), self.block4, relu),
        ]

    @property
    def head(self):
        return Head(self.classifier)

    def stage_preact(self, index, x):
        pre = self.stages[index][:-1](x)  # the stage without its final ReLU
        return F.relu(pre), pre

    def preact_norms(self):
        return [getattr(self, f"block{i}")[-1] for i in range(len(self.stages))]


@register("vgg8")
def vgg8(num_classes=100, in_chans=3, **kwargs):
    return VGG(CONFIGS["vgg8"], num_classes, in_chans, **kwargs)


@register("vgg11")
def vgg11(num_classes=100, in_chans=3, **kwargs):
    return VGG(CONFIGS["vgg11"], num_classes, in_chans, **kwargs)


@register("vgg13")
def vgg13(num_classes=100, in_chans=3, **kwargs):
    return VGG(CONFIGS["vgg13"], num_classes, in_chans, **kwargs)


@register("vgg16")
def vgg16(num_classes=100, in_chans=3, **kwargs):
    return VGG(CONFIGS["vgg16"], num_classes, in_chans, **kwargs)


@register("vgg19")
def vgg19(num_classes=100, in_chans=3, **kwargs):
    return VGG(CONFIGS["vgg19"], num_classes, in_chans, **kwargs)
