"""The half-width MobileNetV2 of the CRD benchmark (Tian et al., 2020), after Sandler et al., 2018."""

from __future__ import annotations

from torch import nn

from ..registry import register
from ..staged import Chain, Head, StagedNet
from .weight_init import init_weights

# (output channels, blocks, first stride) of each group of ``blocks``, before the width multiplier;
# the first group does not expand, the others expand by ``expand_ratio``.
SETTINGS = [(16, 1, 1), (24, 2, 1), (32, 3, 2), (64, 4, 2), (96, 3, 1), (160, 3, 2), (320, 1, 1)]
# Groups of ``blocks`` per resolution stage (the CRD code's feature taps).
STAGES = [(0, 1), (2,), (3, 4), (5, 6)]


def conv_bn_relu(inp: int, oup: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True)
    )


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise, linear 1x1 project (``self.conv``); residual when the shape is kept."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(StagedNet):
    """Stride-2 stem ``conv1``, seven groups of inverted residuals (``blocks``), 1x1 ``conv2`` to 1280.

    Pre-activations: the stage outputs themselves (linear bottlenecks: no ReLU follows); BatchNorm:
    the last one of each stage's last block (the CRD benchmark's ``get_bn_before_relu``; with a
    residual connection it describes the block's branch, not the sum).
    """

    defines_preacts = True

    def __init__(self, expand_ratio: int = 6, width_mult: float = 0.5, num_classes: int = 100, in_chans: int = 3):
        super().__init__()
        channels = int(32 * width_mult)
        self.conv1 = conv_bn_relu(in_chans, channels, 3, 2)
        self.blocks = nn.ModuleList()
        for group, (c, n, s) in enumerate(SETTINGS):
            t = expand_ratio if group else 1
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(channels, int(c * width_mult), s if i == 0 else 1, t))
                channels = int(c * width_mult)
            self.blocks.append(nn.Sequential(*layers))
        last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = conv_bn_relu(channels, last_channel, 1, 1)
        self.classifier = nn.Sequential(nn.Linear(last_channel, num_classes))
        init_weights(self, linear_std=0.01)

    @property
    def stem(self):
        return self.conv1

    @property
    def stages(self):
        return [Chain(*(self.blocks[i] for i in group)) for group in STAGES]

    @property
    def head(self):
        return Head(self.classifier, self.conv2)

    def stage_preact(self, index, x):
        out = self.stages[index](x)
        return out, out

    def preact_norms(self):
        return [self.blocks[group[-1]][-1].conv[-1] for group in STAGES]


@register("MobileNetV2")
def mobilenetv2_half(num_classes=100, in_chans=3, **kwargs):
    return MobileNetV2(num_classes=num_classes, in_chans=in_chans, **kwargs)
