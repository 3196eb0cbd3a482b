"""The CIFAR ResNet-50 of the CRD benchmark (Tian et al., 2020), after He et al., 2016."""

from __future__ import annotations

from torch import nn

from ..registry import register
from ..staged import Chain, Head, StagedNet
from .weight_init import init_weights


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, each with BN; ReLU after the residual sum."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = self.expansion * planes
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes)
            )

    def preact(self, x):
        """The residual sum before the final ReLU."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out)) + self.shortcut(x)

    def forward(self, x):
        return self.relu(self.preact(x))


class BottleneckResNet(StagedNet):
    """A 3x3 stride-1 stem, four bottleneck stages (strides 1, 2, 2, 2), linear ``linear``.

    Pre-activations: each stage's last residual sum before its ReLU; BatchNorm: that block's ``bn3``.
    """

    defines_preacts = True

    def __init__(self, num_blocks: tuple[int, int, int, int], num_classes: int = 100, in_chans: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_planes = 64
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), num_blocks)):
            strides = [1 if i == 0 else 2] + [1] * (blocks - 1)
            layers = []
            for stride in strides:
                layers.append(Bottleneck(in_planes, planes, stride))
                in_planes = planes * Bottleneck.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
        self.linear = nn.Linear(in_planes, num_classes)
        init_weights(self)

    @property
    def stem(self):
        return Chain(self.conv1, self.bn1, nn.ReLU(inplace=True))

    @property
    def stages(self):
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    @property
    def head(self):
        return Head(self.linear)

    def preact_norms(self):
        return [stage[-1].bn3 for stage in self.stages]


@register("ResNet50")
def resnet50_cifar(num_classes=100, in_chans=3, **kwargs):
    return BottleneckResNet((3, 4, 6, 3), num_classes, in_chans, **kwargs)
