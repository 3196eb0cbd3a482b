"""The ShuffleNetV2 (1x) of the CRD benchmark (Tian et al., 2020), after Ma et al., 2018."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register
from ..staged import Chain, Head, StagedNet
from .shufflenetv1 import channel_shuffle


class BasicBlock(nn.Module):
    """Split the channels in half; 1x1, 3x3 depthwise, 1x1 on the second half; concatenate, shuffle."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)

    def branch(self, x2):
        """The processed half before its final ReLU."""
        out = F.relu(self.bn1(self.conv1(x2)))
        return self.bn3(self.conv3(self.bn2(self.conv2(out))))

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([x1, F.relu(self.branch(x2))], 1), 2)

    def preact(self, x):
        """The block's output with the processed half before its ReLU (the passed-through half is
        already non-negative, so the output is this map's ReLU)."""
        x1, x2 = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([x1, self.branch(x2)], 1), 2)


class DownBlock(nn.Module):
    """Two strided branches (depthwise-1x1 and 1x1-depthwise-1x1), concatenated and shuffled."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x):
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(StagedNet):
    """A 1x1 stem to 24 channels, three stages (a down block then basic blocks), a 1x1 ``conv2`` in the head.

    Weights keep PyTorch's default initialisation, as in the CRD code. Pre-activations: each
    stage's last block with its processed half before the ReLU, [chosen] in the output's shuffled
    channel order (the CRD benchmark returns it unshuffled). Half of those channels pass through
    unnormalised, so no BatchNorm describes them (:meth:`preact_norms` is all None).
    """

    defines_preacts = True

    def __init__(self, out_channels=(116, 232, 464, 1024), num_blocks=(3, 7, 3), num_classes=100, in_chans=3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_channels = 24
        for i, (channels, blocks) in enumerate(zip(out_channels, num_blocks)):
            layers = [DownBlock(in_channels, channels)] + [BasicBlock(channels) for _ in range(blocks)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
            in_channels = channels
        self.conv2 = nn.Conv2d(in_channels, out_channels[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)

    @property
    def stem(self):
        return Chain(self.conv1, self.bn1, nn.ReLU(inplace=True))

    @property
    def stages(self):
        return [self.layer1, self.layer2, self.layer3]

    @property
    def head(self):
        return Head(self.linear, Chain(self.conv2, self.bn2, nn.ReLU(inplace=True)))


@register("ShuffleV2")
def shufflev2(num_classes=100, in_chans=3, **kwargs):
    return ShuffleNetV2(num_classes=num_classes, in_chans=in_chans, **kwargs)
