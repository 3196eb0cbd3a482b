"""ImageNet, or any ImageFolder tree with ``train/`` and ``val/`` under ``data_dir``.

Protocol (torchvision recipe, docs/reproduction.md#imagenet): train = RandomResizedCrop 224 + horizontal flip;
eval = Resize 256 + CenterCrop 224; ImageNet mean/std. ``val/`` serves as validation and test split
(the KD protocol reports ImageNet's validation set). ``image_size`` scales the crops (the eval resize
stays at 256/224 of it) so tests and small trees can use tiny images.

Three ways to get there (``decode``), the same transforms in each:

- ``"pil"`` (default): PIL decoding and transforms in DataLoader workers, float batches.
- ``"tensor"``: libjpeg-turbo decoding to uint8 tensors (TorchCodec) and uint8 transforms in the
  workers; uint8 batches (a quarter of the bytes to copy) are normalised on the device.
- ``"device"``: workers only read the files; JPEGs are decoded on the training device (nvJPEG on
  CUDA), cropped, resized, flipped and normalised there. Crop boxes come from a generator seeded by
  ``(seed, global_step, rank)``, so a resumed run draws the same crops (project choice, as for CIFAR).

DDP-safe: every rank builds the same file lists from the same tree; Lightning adds the
``DistributedSampler``. Nothing is downloaded: ImageNet must be obtained and unpacked by hand.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from .. import checks
from ..errors import BadFileError, ConfigError, MissingFileError
from .augment import random_resized_crop_boxes
from .base import ClassificationDataModule, Indexed
from .jpeg import decode_file, decode_to, read_for_device, torchcodec_decoders
from .tensor import normalize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Decode = Literal["pil", "tensor", "device"]
LOADERS = {"pil": default_loader, "tensor": decode_file, "device": read_for_device}


def collate_files(batch: list[tuple[torch.Tensor, int, int]]):
    """``collate_fn`` for ``decode="device"``: file contents of differing lengths stay a list."""
    items, targets, index = zip(*batch)
    return list(items), torch.as_tensor(targets), torch.as_tensor(index)


class ImageNetDataModule(ClassificationDataModule):
    """ImageFolder classification with the ImageNet protocol transforms.

    Args:
        data_dir: directory holding ``train/`` and ``val/``, each with one sub-folder of images per class
            (the same class folders in both).
        batch_size: per process (256 in the protocol on one device; under DDP the global batch is this ×
            world size).
        num_workers: DataLoader workers reading (and, unless ``decode="device"``, decoding) images.
        pin_memory: pin host batches when CUDA is available.
        seed: seeds the epoch shuffles and the ``"device"`` crops.
        image_size: side of the training and evaluation crops (224 in the protocol).
        num_classes: expected number of class folders (1000 for ImageNet); checked against the tree.
        decode: ``"pil"``, ``"tensor"`` or ``"device"`` (module docstring); the last two need TorchCodec.
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
        decode: Decode = "pil",
    ):
        super().__init__(data_dir, batch_size, num_workers, pin_memory, seed)
        checks.choice("ImageNetDataModule", "decode", decode, LOADERS)
        checks.positive_int("ImageNetDataModule", "image_size", image_size)
        checks.positive_int("ImageNetDataModule", "num_classes", num_classes)
        if decode != "pil":
            torchcodec_decoders()
        self.image_size = image_size
        self.num_classes = num_classes
        self.decode = decode

    @property
    def resize_size(self) -> int:
        """Shorter side before the evaluation centre crop: 256 for 224 crops."""
        return round(self.image_size * 256 / 224)

    def transform(self, train: bool) -> v2.Compose | transforms.Compose | None:
        """Per-sample transforms in the workers: the classic transforms of torchvision's reference
        scripts for ``"pil"`` (cheaper on PIL images than v2's), uint8 geometry for ``"tensor"``."""
        if self.decode == "device":
            return None
        api = transforms if self.decode == "pil" else v2
        if train:
            steps = [api.RandomResizedCrop(self.image_size, antialias=True), api.RandomHorizontalFlip()]
        else:
            steps = [api.Resize(self.resize_size, antialias=True), api.CenterCrop(self.image_size)]
        if self.decode == "pil":
            steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        return api.Compose(steps)

    def _folder(self, split: str, train: bool) -> ImageFolder:
        root = self.data_dir / split
        if not root.is_dir():
            raise MissingFileError(
                f"{root} is not a directory: expected {self.data_dir} to hold train/ and val/, "
                "each with one sub-folder of images per class"
            )
        dataset = ImageFolder(str(root), transform=self.transform(train), loader=LOADERS[self.decode], allow_empty=True)
        counts = torch.bincount(torch.as_tensor(dataset.targets, dtype=torch.long), minlength=len(dataset.classes))
        empty = [dataset.classes[i] for i in (counts == 0).nonzero().flatten().tolist()]
        if empty:
            raise MissingFileError(
                f"{root}: class folder(s) {', '.join(empty[:5])}{' …' if len(empty) > 5 else ''} hold no image "
                f"(extensions {', '.join(IMG_EXTENSIONS)})"
            )
        return dataset

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train, val = self._folder("train", train=True), self._folder("val", train=False)
        if len(train.classes) != self.num_classes:
            raise ConfigError(
                f"{self.data_dir / 'train'} has {len(train.classes)} class folders, "
                f"expected num_classes={self.num_classes}"
            )
        if val.classes != train.classes:
            only_train = sorted(set(train.classes) - set(val.classes))
            only_val = sorted(set(val.classes) - set(train.classes))
            raise BadFileError(
                f"{self.data_dir}: train/ and val/ hold different class folders "
                f"(only in train/: {only_train[:5]}, only in val/: {only_val[:5]})"
            )
        self.train_set = Indexed(train)
        self.val_set = self.test_set = Indexed(val)

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        return super()._loader(dataset, train, collate_fn=collate_files if self.decode == "device" else None)

    @property
    def _training(self) -> bool:
        return self.trainer is not None and self.trainer.training

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        if self.decode != "device":
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        items, targets, index = batch
        samples = (self.train_set if self._training else self.val_set).dataset.samples
        images = decode_to(items, device, name=lambda i: samples[int(index[i])][0])
        return images, targets.to(device, non_blocking=True), index.to(device, non_blocking=True)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.decode == "pil":
            return batch
        images, targets, index = batch
        if self.decode == "device":
            images = self._train_crops(images) if self._training else self._eval_crops(images)
        return normalize(images, IMAGENET_MEAN, IMAGENET_STD), targets, index

    def _train_crops(self, images: list[torch.Tensor]) -> torch.Tensor:
        """RandomResizedCrop + horizontal flip of decoded images, boxes drawn for the batch at once."""
        generator = self.augmentation_generator(torch.device("cpu"))
        boxes = random_resized_crop_boxes(torch.tensor([image.shape[-2:] for image in images]), generator)
        flips = (torch.rand(len(images), generator=generator) < 0.5).tolist()
        size = [self.image_size, self.image_size]
        crops = [TF.resized_crop(image, *box, size, antialias=True) for image, box in zip(images, boxes.tolist())]
        return torch.stack([crop.flip(-1) if flip else crop for crop, flip in zip(crops, flips)])

    def _eval_crops(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Resize (shorter side) + CenterCrop, as the evaluation transform."""
        resized = (TF.resize(image, [self.resize_size], antialias=True) for image in images)
        return torch.stack([TF.center_crop(image, [self.image_size]) for image in resized])
