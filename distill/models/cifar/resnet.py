"""CIFAR ResNets of the CRD benchmark (Tian et al., 2020), after He et al., 2016."""

from __future__ import annotations

from torch import nn

from ..registry import register
from ..staged import Chain, Head, StagedNet
from .weight_init import init_weights


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN) shortcut, ReLU after the sum."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def preact(self, x):
        """The residual sum before the final ReLU."""
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return out + (x if self.downsample is None else self.downsample(x))

    def forward(self, x):
        return self.relu(self.preact(x))


class CifarResNet(StagedNet):
    """Depth 6n+2: a 3x3 stem, three stages of n basic blocks (strides 1, 2, 2), linear ``fc``.

    Pre-activations: each stage's last residual sum before its ReLU; BatchNorm: that block's ``bn2``
    (the CRD benchmark's ``get_bn_before_relu``).
    """

    defines_preacts = True

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 100, in_chans: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(widths[0], widths[1], n, 1)
        self.layer2 = self._make_layer(widths[1], widths[2], n, 2)
        self.layer3 = self._make_layer(widths[2], widths[3], n, 2)
        self.fc = nn.Linear(widths[3], num_classes)
        init_weights(self)

    @staticmethod
    def _make_layer(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(inplanes, planes, stride)]
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    @property
    def stem(self):
        return Chain(self.conv1, self.bn1, self.relu)

    @property
    def stages(self):
        return [self.layer1, self.layer2, self.layer3]

    @property
    def head(self):
        return Head(self.fc)

    def preact_norms(self):
        return [stage[-1].bn2 for stage in self.stages]


THIN, WIDE = (16, 16, 32, 64), (32, 64, 128, 256)


@register("resnet8")
def resnet8(num_classes=100, in_chans=3, **kwargs):
    return CifarResNet(8, THIN, num_classes, in_chans, **kwargs)


@register("resnet14")
def resnet14(num_classes=100, in_chans=3, **kwargs):
    return CifarResNet(14, THIN, num_classes, in_chans, **kwargs)


@register("resnet20")
def resnet20(num_classes=100, in_chans=3, **kwargs):
    return CifarResNet(20, THIN, num_classes, in_chans, **kwargs)


@register("resnet32")
def resnet32(num_classes=100, in_chans=3, **kwargs):
    return CifarResNet(32, THIN, num_classes, in_chans, **kwargs)


@register("resnet44")
def resnet44(num_classes=100, in_chans=3, **kwargs):
    return CifarResNet(44, THIN, num_classes, in_chans, **kwargs)


@register("resnet56")
def resnet56(num_classes=100, in_chans=3, **kwargs):
    return CifarResNet(56, THIN, num_classes, in_chans, **kwargs)


@register("resnet110")
def resnet110(num_classes=100, in_chans=3, **kwargs):
    return CifarResNet(110, THIN, num_classes, in_chans, **kwargs)


@register("resnet8x4")
def resnet8x4(num_classes=100, in_chans=3, **kwargs):
    return CifarResNet(8, WIDE, num_classes, in_chans, **kwargs)


@register("resnet32x4")
def resnet32x4(num_classes=100, in_chans=3, **kwargs):
    return CifarResNet(32, WIDE, num_classes, in_chans, **kwargs)
