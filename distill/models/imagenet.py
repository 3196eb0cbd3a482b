"""ImageNet ResNets (He et al., 2016) and MobileNetV2 (Sandler et al., 2018) from torchvision, staged."""

from __future__ import annotations

import torchvision
from torch import nn
from torchvision.models.resnet import Bottleneck

from .registry import register
from .staged import Chain, Head, StagedNet


def with_in_chans(conv: nn.Conv2d, in_chans: int) -> nn.Conv2d:
    """``conv`` itself, or a freshly initialised copy reading ``in_chans`` channels."""
    if conv.in_channels == in_chans:
        return conv
    new = nn.Conv2d(
        in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None
    )
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    return new


class TorchvisionNet(StagedNet):
    """A torchvision model's children at the top level, so its parameter names stay torchvision's."""

    def __init__(self, net: nn.Module):
        super().__init__()
        for name, child in net.named_children():
            if name != "avgpool":  # the head pools
                self.add_module(name, child)


def residual_preact(block: nn.Module, x):
    """A torchvision residual block's sum before its final ReLU (its ``forward`` without that ReLU)."""
    out = block.relu(block.bn1(block.conv1(x)))
    if isinstance(block, Bottleneck):
        out = block.relu(block.bn2(block.conv2(out)))
        out = block.bn3(block.conv3(out))
    else:
        out = block.bn2(block.conv2(out))
    return out + (x if block.downsample is None else block.downsample(x))


def last_norm(block: nn.Module) -> nn.Module:
    return block.bn3 if isinstance(block, Bottleneck) else block.bn2


class ResNet(TorchvisionNet):
    """Stem conv1-bn1-relu-maxpool, stages layer1..layer4, head ``fc``.

    Pre-activations: each stage's last residual sum before its ReLU; BatchNorm: that block's last one.
    """

    defines_preacts = True

    def __init__(self, net: torchvision.models.ResNet, in_chans: int = 3):
        super().__init__(net)
        self.conv1 = with_in_chans(self.conv1, in_chans)

    @property
    def stem(self):
        return Chain(self.conv1, self.bn1, self.relu, self.maxpool)

    @property
    def stages(self):
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    @property
    def head(self):
        return Head(self.fc)

    block_preact = staticmethod(residual_preact)

    def preact_norms(self):
        return [last_norm(stage[-1]) for stage in self.stages]


class MobileNetV2(TorchvisionNet):
    """Stem ``features[0]``; stages end at strides 4, 8, 16, 32; the last 1x1 conv is the head's ``pre``.

    Pre-activations: the stage outputs themselves (linear bottlenecks); BatchNorm: the last one of
    each stage's last block.
    """

    defines_preacts = True

    STAGES = [(1, 4), (4, 7), (7, 14), (14, 18)]

    def __init__(self, net: torchvision.models.MobileNetV2, in_chans: int = 3):
        super().__init__(net)
        self.features[0][0] = with_in_chans(self.features[0][0], in_chans)

    @property
    def stem(self):
        return self.features[0]

    @property
    def stages(self):
        return [Chain(*self.features[start:end]) for start, end in self.STAGES]

    @property
    def head(self):
        return Head(self.classifier, self.features[-1])

    def stage_preact(self, index, x):
        out = self.stages[index](x)
        return out, out

    def preact_norms(self):
        return [self.features[end - 1].conv[-1] for _, end in self.STAGES]


@register("resnet18")
def resnet18(num_classes=1000, in_chans=3, **kwargs):
    return ResNet(torchvision.models.resnet18(weights=None, num_classes=num_classes, **kwargs), in_chans)


@register("resnet34")
def resnet34(num_classes=1000, in_chans=3, **kwargs):
    return ResNet(torchvision.models.resnet34(weights=None, num_classes=num_classes, **kwargs), in_chans)


@register("resnet50")
def resnet50(num_classes=1000, in_chans=3, **kwargs):
    return ResNet(torchvision.models.resnet50(weights=None, num_classes=num_classes, **kwargs), in_chans)


@register("mobilenet_v2")
def mobilenet_v2(num_classes=1000, in_chans=3, **kwargs):
    return MobileNetV2(torchvision.models.mobilenet_v2(weights=None, num_classes=num_classes, **kwargs), in_chans)
