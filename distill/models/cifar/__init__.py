"""The CIFAR zoo of the CRD benchmark (Tian et al., 2020); importing it registers every model."""

from . import mobilenetv2, resnet, resnet_bottleneck, shufflenetv1, shufflenetv2, vgg, wrn  # noqa: F401
