"""The scikit-learn digits (1,797 8×8 grey images, 10 classes): the embedded default dataset.

It ships inside scikit-learn, so the demo and the fast tests need no download. Project choices:
a fixed stratified 80/20 split (seed 0; the 20% is the test split, and the validation split unless
``val_fraction`` holds one out of the 80%), images upscaled once to ``image_size`` (default 16, so
VGG's four poolings still fit), a random shift of up to ``pad`` pixels as training augmentation (no
flip: digits are not mirror-symmetric), and ``train_fraction`` to keep a stratified subset of the
training split (the demo's students learn from 10% of it, where a teacher's soft targets visibly
matter; the full digits are too easy). Both subsets come from :mod:`distill.data.splits`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .. import checks
from .augment import random_crop_flip
from .base import ClassificationDataModule
from .splits import stratified_split

DIGITS_SEED = 0


class TensorImages(Dataset):
    """Images held as one float tensor (augmentation happens per batch, after transfer)."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor):
        self.images, self.targets = images, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return self.images[index], self.targets[index], index


class DigitsDataModule(ClassificationDataModule):
    num_classes = 10
    in_chans = 1

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        image_size: int = 16,
        pad: int = 2,
        test_fraction: float = 0.2,
        train_fraction: float = 1.0,
        val_fraction: float = 0.0,
        split_seed: int = 0,
        seed: int = 0,
    ):
        super().__init__(".", batch_size, num_workers, False, seed, train_fraction, val_fraction, split_seed)
        checks.positive_int("DigitsDataModule", "image_size", image_size)
        checks.non_negative_int("DigitsDataModule", "pad", pad)
        checks.fraction("DigitsDataModule", "test_fraction", test_fraction, one=False)
        self.image_size = image_size
        self.pad = pad
        self.test_fraction = test_fraction

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        if self.image_size != images.shape[-1]:
            images = F.interpolate(images, size=self.image_size, mode="bilinear", align_corners=False)
        targets = torch.tensor(digits.target, dtype=torch.long)
        train_idx, test_idx = stratified_split(targets, self.test_fraction, DIGITS_SEED)
        mean, std = images[train_idx].mean(), images[train_idx].std()  # of the whole train split
        images = (images - mean) / std
        kept, val = self.split_training(targets[train_idx])
        self.train_set = TensorImages(images[train_idx[kept]], targets[train_idx[kept]])
        self.test_set = TensorImages(images[test_idx], targets[test_idx])
        self.val_set = TensorImages(images[train_idx[val]], targets[train_idx[val]]) if len(val) else self.test_set

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.pad and self.trainer is not None and self.trainer.training:
            images, targets, index = batch
            generator = self.augmentation_generator(images.device)
            batch = (random_crop_flip(images, self.pad, flip=False, generator=generator), targets, index)
        return batch
