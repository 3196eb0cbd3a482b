"""Small datasets held in memory as one uint8 tensor, served by either of two pipelines.

- ``"torchvision"``: per-sample torchvision transforms on uint8 tensors in DataLoader workers.
- ``"device"``: uint8 batches are sliced from the one in-memory tensor (one indexing op per batch,
  in the main process), moved to the device and augmented + normalised there as a whole batch in
  ``on_after_batch_transfer``. Crops are drawn from a generator seeded by
  ``(seed, global_step, rank)``, so a resumed run draws the same crops as an uninterrupted one
  (project choice) and DDP ranks draw independently.

Used by CIFAR-100 and Fashion-MNIST, which both take ``train_fraction``, ``val_fraction`` and
``split_seed`` (stratified, fixed subsets: :mod:`distill.data.splits`).
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from .. import checks
from .augment import random_crop_flip
from .base import ClassificationDataModule

Pipeline = Literal["torchvision", "device"]


class UInt8Images(Dataset):
    """Images held as one uint8 tensor ``(N, C, H, W)``; items are ``(transform(image), target, index)``."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, transform=None):
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images, self.targets, self.transform = images, targets, transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index]), index


class UInt8Batches(UInt8Images):
    """The same images served a batch at a time, untransformed.

    The DataLoader hands ``__getitems__`` all indices of a batch, answered by one indexing op; the
    loader's ``collate_fn`` must then be :func:`already_collated`.
    """

    def __getitems__(self, indices: list[int]):
        index = torch.as_tensor(indices, dtype=torch.long)
        return self.images[index], self.targets[index], index


def already_collated(batch):
    """``collate_fn`` for :class:`UInt8Batches`: the batch is already one tuple of tensors."""
    return batch


@functools.lru_cache(maxsize=16)
def scale_and_shift(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device):
    """The per-channel ``(scale, shift)`` of :func:`normalize` on ``device``, made once: a tensor
    built from a list on a GPU is a synchronous copy, which a training step must not wait for."""
    scale = torch.tensor([1 / (255 * s) for s in std], device=device).view(1, -1, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], device=device).view(1, -1, 1, 1)
    return scale, shift


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` → float32 scaled to [0, 1] and normalised per channel, as one scale and shift."""
    scale, shift = scale_and_shift(tuple(mean), tuple(std), images.device)
    return images.float().mul_(scale).add_(shift)


class UInt8ImageDataModule(ClassificationDataModule):
    """Base for small sets read into memory as uint8 tensors, served by either pipeline.

    Subclasses set ``mean``, ``std``, ``pad`` and ``flip`` and implement :meth:`read_splits`.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    pad: int
    flip: bool

    def __init__(
        self,
        data_dir: str,
        batch_size: int,
        num_workers: int,
        pin_memory: bool,
        seed: int,
        pipeline: Pipeline,
        train_fraction: float = 1.0,
        val_fraction: float = 0.0,
        split_seed: int = 0,
    ):
        super().__init__(data_dir, batch_size, num_workers, pin_memory, seed, train_fraction, val_fraction, split_seed)
        checks.choice(type(self).__name__, "pipeline", pipeline, ("torchvision", "device"))
        self.pipeline = pipeline

    def read_splits(self) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """``((train_images, train_targets), (test_images, test_targets))``, images uint8 ``(N, C, H, W)``."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        (train_x, train_y), (test_x, test_y) = self.read_splits()
        train, val = self.split_training(train_y)
        self.test_set = self.dataset(test_x, test_y, train=False)
        self.val_set = self.dataset(train_x[val], train_y[val], train=False) if len(val) else self.test_set
        if len(train) < len(train_y):  # indexing copies: skipped for the whole split
            train_x, train_y = train_x[train], train_y[train]
        self.train_set = self.dataset(train_x, train_y, train=True)

    def dataset(self, images: torch.Tensor, targets: torch.Tensor, train: bool) -> UInt8Images:
        """The pipeline's dataset of one split: whole uint8 batches (``device``) or transformed samples."""
        if self.pipeline == "device":
            return UInt8Batches(images, targets)
        return UInt8Images(images, targets, self.transform(train))

    def transform(self, train: bool) -> v2.Compose:
        """The per-sample torchvision pipeline: zero-padded random crop and flip when training, then normalise."""
        steps = []
        if train and self.pad:
            steps.append(v2.RandomCrop(self.image_size, padding=self.pad, fill=0))
        if train and self.flip:
            steps.append(v2.RandomHorizontalFlip())
        return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)])

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if self.pipeline == "torchvision":
            return super()._loader(dataset, train)
        return super()._loader(dataset, train, collate_fn=already_collated, num_workers=0)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.pipeline != "device":
            return batch
        images, targets, index = batch
        if self.trainer is not None and self.trainer.training:
            generator = self.augmentation_generator(images.device)
            images = random_crop_flip(images, self.pad, self.flip, generator)
        return normalize(images, self.mean, self.std), targets, index
