"""Shared shape of every DataModule: what the model needs to know, and index-carrying batches.

Every dataset yields ``(image, target, index)``; the index is the sample's position in its split,
which contrastive memories (CRD) key on. Training batches follow a permutation of ``(seed, epoch)``
split over the DDP ranks and resume mid-epoch; evaluation sees every sample exactly once
(:mod:`distill.data.distributed`).
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from .. import checks
from .augment import step_generator
from .distributed import ResumableLoader, split_sampler
from .splits import train_val_indices


class Indexed(Dataset):
    """Wrap a ``(image, target)`` dataset so items become ``(image, target, index)``."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def targets(self):
        return self.dataset.targets

    def __getitem__(self, index: int):
        image, target = self.dataset[index]
        return image, target, index


class ClassificationDataModule(pl.LightningDataModule):
    """Base for image classification data: subclasses set ``train_set``/``val_set``/``test_set`` in ``setup``.

    ``num_classes``, ``in_chans`` and ``image_size`` are class attributes or set in ``__init__`` so
    the CLI can link them into the model before any data is read. The validation split is the test
    split (the KD literature's CIFAR/ImageNet protocol) unless ``val_fraction > 0`` holds a stratified
    validation split out of the training split (subclasses that take the argument; see
    :mod:`distill.data.splits`); ``train_fraction`` keeps a stratified share of what is left.
    """

    num_classes: int
    in_chans: int
    image_size: int

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 64,
        num_workers: int = 2,
        pin_memory: bool = True,
        seed: int = 0,
        train_fraction: float = 1.0,
        val_fraction: float = 0.0,
        split_seed: int = 0,
    ):
        super().__init__()
        owner = type(self).__name__
        checks.positive_int(owner, "batch_size", batch_size)
        checks.non_negative_int(owner, "num_workers", num_workers)
        self.seed = seed
        checks.fraction(owner, "train_fraction", train_fraction)
        checks.fraction(owner, "val_fraction", val_fraction, zero=True, one=False)
        self.train_fraction, self.val_fraction = float(train_fraction), float(val_fraction)
        self.split_seed = split_seed
        self.data_dir = Path(data_dir)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self._train_loader: ResumableLoader | None = None
        self._train_position: dict | None = None  # from a checkpoint, for the next training loader

    @property
    def holds_out_validation(self) -> bool:
        """Whether validation reads images held out from the training split (else it reads the test split)."""
        return self.val_fraction > 0

    def split_training(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices ``(train, val)`` into a training split of labels ``targets``: ``val`` is empty when
        ``val_fraction`` is 0 (:func:`distill.data.splits.train_val_indices`)."""
        return train_val_indices(targets, self.val_fraction, self.train_fraction, self.split_seed)

    @property
    def train_targets(self) -> torch.Tensor:
        """Labels of the training split in dataset-index order (every split dataset has ``.targets``)."""
        if self.train_set is None:
            self.setup("fit")
        return torch.as_tensor(self.train_set.targets, dtype=torch.long)

    def augmentation_generator(self, device: torch.device) -> torch.Generator:
        """The generator of batched augmentation for this training step on this rank: a function of
        ``(seed, global_step, global_rank)``, so a resumed run draws what the uninterrupted one drew
        (project choice) and DDP ranks draw independently."""
        trainer = self.trainer
        return step_generator(self.seed, trainer.global_step, device, getattr(trainer, "global_rank", 0))

    def _loader(
        self, dataset: Dataset | None, train: bool, collate_fn=None, num_workers: int | None = None
    ) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not built this split yet")
        workers = self.num_workers if num_workers is None else num_workers
        loader = (ResumableLoader if train else DataLoader)(
            dataset,
            batch_size=self.batch_size,
            sampler=split_sampler(len(dataset), train, self.seed, self.trainer),
            drop_last=False,
            collate_fn=collate_fn,
            num_workers=workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=workers > 0,
        )
        if train:
            self._train_loader = loader
            if self._train_position:
                loader.load_state_dict(self._train_position)
                self._train_position = None
        return loader

    def state_dict(self) -> dict:
        """The training loader's position (epoch, batches consumed): a mid-epoch checkpoint resumes at the
        next batch."""
        return {"train_position": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state: dict) -> None:
        position = state.get("train_position")
        if position and self._train_loader is not None:
            self._train_loader.load_state_dict(position)
        else:
            self._train_position = position

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)
