"""The ShuffleNetV1 of the CRD benchmark (Tian et al., 2020), after Zhang et al., 2018."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register
from ..staged import Chain, Head, StagedNet


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[N, g*c, H, W] -> [N, c*g, H, W]: interleave the channels of the ``groups`` groups."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class Bottleneck(nn.Module):
    """Grouped 1x1, shuffle, 3x3 depthwise, grouped 1x1; strided blocks concatenate an avg-pooled input."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        mid_planes = out_planes // 4
        # The first block reads the 24-channel stem, too thin to group (as in the CRD code).
        self.groups1 = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid_planes, 1, groups=self.groups1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.conv2 = nn.Conv2d(mid_planes, mid_planes, 3, stride, 1, groups=mid_planes, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)

    def preact(self, x):
        """The concatenation (strided) or residual sum before the final ReLU."""
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.groups1)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            return torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1)
        return out + x

    def forward(self, x):
        return F.relu(self.preact(x))


class ShuffleNetV1(StagedNet):
    """A 1x1 stem to 24 channels and three stages; each stage's first block halves the resolution.

    Weights keep PyTorch's default initialisation, as in the CRD code. Pre-activations: each
    stage's last sum before its ReLU; BatchNorm: that block's ``bn3`` ([chosen]: the same reading
    as for the ResNets; the CRD benchmark defines none for ShuffleNets).
    """

    defines_preacts = True

    def __init__(self, out_planes=(240, 480, 960), num_blocks=(4, 8, 4), groups=3, num_classes=100, in_chans=3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_planes = 24
        for i, (planes, blocks) in enumerate(zip(out_planes, num_blocks)):
            # The strided first block concatenates its input, so its own branch is narrower.
            layers = [Bottleneck(in_planes, planes - in_planes, 2, groups)]
            layers += [Bottleneck(planes, planes, 1, groups) for _ in range(blocks - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
            in_planes = planes
        self.linear = nn.Linear(in_planes, num_classes)

    @property
    def stem(self):
        return Chain(self.conv1, self.bn1, nn.ReLU(inplace=True))

    @property
    def stages(self):
        return [self.layer1, self.layer2, self.layer3]

    @property
    def head(self):
        return Head(self.linear)

    def preact_norms(self):
        # a strided last block concatenates an unnormalised pooled input: no single BatchNorm then
        return [None if stage[-1].stride == 2 else stage[-1].bn3 for stage in self.stages]


@register("ShuffleV1")
def shufflev1(num_classes=100, in_chans=3, **kwargs):
    return ShuffleNetV1(num_classes=num_classes, in_chans=in_chans, **kwargs)
