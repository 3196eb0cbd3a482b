"""Wide ResNets of the CRD benchmark (Tian et al., 2020), after Zagoruyko & Komodakis, 2016."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..registry import register
from ..staged import Chain, Head, StagedNet, StagedOutput
from .weight_init import init_weights


class BasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv twice; a 1x1 shortcut on the activated input when widths differ."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.convShortcut = None
        if in_planes != out_planes:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

    def forward(self, x):
        return self.from_activation(x, self.relu1(self.bn1(x)))

    def from_activation(self, x, act):
        """The block given its input ``x`` and ``act`` = ReLU(bn1(x))."""
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return self.conv2(self.relu2(self.bn2(self.conv1(act)))) + shortcut


class NetworkBlock(nn.Module):
    """One resolution stage: ``n`` blocks in ``self.layer``, the first one strided."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        blocks = [BasicBlock(in_planes, out_planes, stride)]
        blocks += [BasicBlock(out_planes, out_planes, 1) for _ in range(n - 1)]
        self.layer = nn.Sequential(*blocks)

    def forward(self, x):
        return self.layer(x)


class WideResNet(StagedNet):
    """Depth 6n+4, widths 16, 16k, 32k, 64k; the final BN-ReLU (``bn1``) lives in the head.

    Pre-activations (as the CRD benchmark's ``preact=True``): a stage's output is a residual sum that
    no ReLU touches; its pre-activation is the output of the next BatchNorm that feeds a ReLU, i.e.
    ``bn1`` of the next stage's first block, and the head's ``bn1`` for the last stage. They are
    read where the network computes them (no second BatchNorm pass, so no extra statistics update).
    """

    defines_preacts = True

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100, in_chans: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(widths[3], num_classes)
        init_weights(self)
        nn.init.zeros_(self.fc.bias)

    @property
    def stem(self):
        return self.conv1

    @property
    def stages(self):
        return [self.block1, self.block2, self.block3]

    @property
    def head(self):
        return Head(self.fc, Chain(self.bn1, self.relu))

    def preact_norms(self):
        return [self.block2.layer[0].bn1, self.block3.layer[0].bn1, self.bn1]

    def forward_preacts(self, x):
        x = self.stem(x)
        outputs, preacts, act = [], [], None
        for stage, norm in zip(self.stages, self.preact_norms()):
            first = stage.layer[0]
            x = stage.layer[1:](first(x) if act is None else first.from_activation(x, act))
            preacts.append(norm(x))
            act = F.relu(preacts[-1])  # what the next stage's first block (or the head) continues from
            outputs.append(x)
        feature, embedding = Head(self.fc).features(act)
        return StagedOutput(
            self.fc(embedding), tuple(outputs), feature, embedding, tuple(preacts), self.preact_bn_params()
        )


@register("wrn_16_1")
def wrn_16_1(num_classes=100, in_chans=3, **kwargs):
    return WideResNet(16, 1, num_classes, in_chans, **kwargs)


@register("wrn_16_2")
def wrn_16_2(num_classes=100, in_chans=3, **kwargs):
    return WideResNet(16, 2, num_classes, in_chans, **kwargs)


@register("wrn_40_1")
def wrn_40_1(num_classes=100, in_chans=3, **kwargs):
    return WideResNet(40, 1, num_classes, in_chans, **kwargs)


@register("wrn_40_2")
def wrn_40_2(num_classes=100, in_chans=3, **kwargs):
    return WideResNet(40, 2, num_classes, in_chans, **kwargs)
