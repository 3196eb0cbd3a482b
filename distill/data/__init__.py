"""LightningDataModules; every batch is ``(images, targets, indices)``."""

from .base import ClassificationDataModule
from .cifar import CIFAR100DataModule
from .digits import DigitsDataModule
from .fashion_mnist import FashionMNISTDataModule
from .imagenet import ImageNetDataModule

__all__ = [
    "CIFAR100DataModule",
    "ClassificationDataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "ImageNetDataModule",
]
