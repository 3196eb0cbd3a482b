"""ImageNet, or any ImageFolder tree with ``train/`` and ``val/`` under ``data_dir``.

Protocol (torchvision recipe, METHODS.md §1): train = RandomResizedCrop 224 + horizontal flip;
eval = Resize 256 + CenterCrop 224; ImageNet mean/std. ``val/`` serves as validation and test split
(the KD protocol reports ImageNet's validation set). ``image_size`` scales the crops (the eval resize
stays at 256/224 of it) so tests and small trees can use tiny images.

DDP-safe: every rank builds the same file lists from the same tree; Lightning adds the
``DistributedSampler``. Nothing is downloaded: ImageNet must be obtained and unpacked by hand.
"""
from __future__ import annotations

import torch
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from .base import ClassificationDataModule, Indexed

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageNetDataModule(ClassificationDataModule):
    """ImageFolder classification with the ImageNet protocol transforms.

    Args:
        data_dir: directory holding ``train/`` and ``val/``, each with one sub-folder of images per class
            (the same class folders in both).
        batch_size: per process (256 in the protocol on one device; under DDP the global batch is this ×
            world size).
        num_workers: DataLoader workers decoding images (project default 8).
        pin_memory: pin host batches when CUDA is available.
        seed: seeds the epoch shuffles.
        image_size: side of the training and evaluation crops (224 in the protocol).
        num_classes: expected number of class folders (1000 for ImageNet); checked against the tree.
    """

    in_chans = 3

    def __init__(
        self,
        data_dir: str = "data/imagenet",
        batch_size: int = 256,
        num_workers: int = 8,
        pin_memory: bool = True,
        seed: int = 0,
        image_size: int = 224,
        num_classes: int = 1000,
    ):
        super().__init__(data_dir, batch_size, num_workers, pin_memory, seed)
        self.image_size = image_size
        self.num_classes = num_classes

    def transform(self, train: bool) -> v2.Compose:
        if train:
            steps = [v2.RandomResizedCrop(self.image_size, antialias=True), v2.RandomHorizontalFlip()]
        else:
            resize = round(self.image_size * 256 / 224)
            steps = [v2.Resize(resize, antialias=True), v2.CenterCrop(self.image_size)]
        tail = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        return v2.Compose(steps + tail)

    def _folder(self, split: str, train: bool) -> ImageFolder:
        root = self.data_dir / split
        if not root.is_dir():
            raise FileNotFoundError(
                f"{root} is not a directory: expected {self.data_dir} to hold train/ and val/, "
                "each with one sub-folder of images per class"
            )
        dataset = ImageFolder(str(root), transform=self.transform(train), allow_empty=True)
        counts = torch.bincount(torch.as_tensor(dataset.targets, dtype=torch.long), minlength=len(dataset.classes))
        empty = [dataset.classes[i] for i in (counts == 0).nonzero().flatten().tolist()]
        if empty:
            raise FileNotFoundError(
                f"{root}: class folder(s) {', '.join(empty[:5])}{' …' if len(empty) > 5 else ''} hold no image "
                f"(extensions {', '.join(IMG_EXTENSIONS)})"
            )
        return dataset

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train, val = self._folder("train", train=True), self._folder("val", train=False)
        if len(train.classes) != self.num_classes:
            raise ValueError(
                f"{self.data_dir / 'train'} has {len(train.classes)} class folders, "
                f"expected num_classes={self.num_classes}"
            )
        if val.classes != train.classes:
            only_train = sorted(set(train.classes) - set(val.classes))
            only_val = sorted(set(val.classes) - set(train.classes))
            raise ValueError(
                f"{self.data_dir}: train/ and val/ hold different class folders "
                f"(only in train/: {only_train[:5]}, only in val/: {only_val[:5]})"
            )
        self.train_set = Indexed(train)
        self.val_set = self.test_set = Indexed(val)
