"""CIFAR-100 from the official python-format files, and the two uint8-tensor pipelines it shares with
the other small sets (Fashion-MNIST).

Protocol (CRD benchmark, METHODS.md §1): train = random crop 32 with zero padding 4 + horizontal
flip + normalisation; test = normalisation only; the test split is also the validation split.

Pipelines (``pipeline`` argument), the same protocol either way:

- ``"torchvision"``: per-sample torchvision transforms on uint8 tensors in DataLoader workers.
- ``"device"``: uint8 batches are sliced from the one in-memory tensor (one indexing op per batch,
  in the main process), moved to the device and augmented + normalised there as a whole batch in
  ``on_after_batch_transfer``. Crops are drawn from a generator seeded by ``(seed, global_step)``,
  so a resumed run draws the same crops as an uninterrupted one (project choice).
"""
from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from .augment import random_crop_flip, step_generator
from .base import ClassificationDataModule, EpochShuffleSampler

Pipeline = Literal["torchvision", "device"]

CIFAR100_FOLDER = "cifar-100-python"
# The official files' MD5s, as torchvision.datasets.CIFAR100 lists them.
CIFAR100_MD5 = {
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "meta": "7973b15100ade9c7d40fb424638fde48",
}
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_TGZ_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)


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


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` → float32 scaled to [0, 1] and normalised per channel."""
    mean_t = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float().div_(255) - mean_t) / std_t


class UInt8ImageDataModule(ClassificationDataModule):
    """Base for small sets read into memory as uint8 tensors, served by either pipeline.

    Subclasses set ``mean``, ``std``, ``pad`` and ``flip`` and implement :meth:`read_splits`.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    pad: int
    flip: bool

    def __init__(
        self, data_dir: str, batch_size: int, num_workers: int, pin_memory: bool, seed: int, pipeline: Pipeline
    ):
        super().__init__(data_dir, batch_size, num_workers, pin_memory, seed)
        if pipeline not in ("torchvision", "device"):
            raise ValueError(f"pipeline={pipeline!r}: expected 'torchvision' or 'device'")
        self.pipeline = pipeline

    def read_splits(self) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """``((train_images, train_targets), (test_images, test_targets))``, images uint8 ``(N, C, H, W)``."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        (train_x, train_y), (test_x, test_y) = self.read_splits()
        if self.pipeline == "device":
            self.train_set, test_set = UInt8Batches(train_x, train_y), UInt8Batches(test_x, test_y)
        else:
            self.train_set = UInt8Images(train_x, train_y, self.transform(train=True))
            test_set = UInt8Images(test_x, test_y, self.transform(train=False))
        self.val_set = self.test_set = test_set

    def transform(self, train: bool) -> v2.Compose:
        """The per-sample torchvision pipeline: zero-padded random crop and flip when training, then normalise."""
        steps = []
        if train and self.pad:
            steps.append(v2.RandomCrop(self.image_size, padding=self.pad, fill=0))
        if train and self.flip:
            steps.append(v2.RandomHorizontalFlip())
        return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)])

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if self.pipeline == "torchvision" or dataset is None:
            return super()._loader(dataset, train)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(dataset), self.seed) if train else None,
            collate_fn=already_collated,
            num_workers=0,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
        )

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.pipeline != "device":
            return batch
        images, targets, index = batch
        if self.trainer is not None and self.trainer.training:
            generator = step_generator(self.seed, self.trainer.global_step, images.device)
            images = random_crop_flip(images, self.pad, self.flip, generator)
        return normalize(images, self.mean, self.std), targets, index


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only what the official files hold (dicts, lists, strings, numpy arrays): no code runs."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),  # written by the official (Python 2) files
        ("numpy._core.multiarray", "_reconstruct"),  # written by numpy >= 2
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes in a Python 3 protocol-2 pickle
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of the CIFAR format")
        return super().find_class(module, name)


def load_cifar_pickle(path: Path, keys: tuple[str, ...]) -> dict:
    """One file of the official python format (a pickled dict holding ``keys``), read as torchvision does."""
    with open(path, "rb") as f:
        try:
            entry = _ArrayUnpickler(f, encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError) as error:
            raise RuntimeError(f"{path}: not a CIFAR python-format file ({error})") from error
    missing = [key for key in keys if not isinstance(entry, dict) or key not in entry]
    if missing:
        raise RuntimeError(f"{path}: not a CIFAR python-format file (no {', '.join(missing)})")
    return entry


def file_md5(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class CIFAR100DataModule(UInt8ImageDataModule):
    """CIFAR-100 (50,000 train / 10,000 test 32×32 colour images, 100 fine classes), CRD protocol.

    Reads ``data_dir/cifar-100-python/{train,test,meta}`` (the official archive's content, as
    ``torchvision.datasets.CIFAR100`` leaves it).

    Args:
        data_dir: directory holding ``cifar-100-python/``.
        batch_size: per process (64 in the protocol; under DDP the global batch is this × world size).
        num_workers: DataLoader workers of the ``"torchvision"`` pipeline (``"device"`` uses none).
        pin_memory: pin host batches when CUDA is available.
        seed: seeds the epoch shuffles and the ``"device"`` pipeline's crops.
        pipeline: ``"torchvision"`` (per-sample, in workers) or ``"device"`` (per batch, on the device).
        download: fetch and extract the official archive through torchvision when the files are missing.
        verify_md5: check the three files against the official MD5s before reading them.
    """

    num_classes = 100
    in_chans = 3
    image_size = 32
    mean, std = CIFAR100_MEAN, CIFAR100_STD
    pad, flip = 4, True

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 64,
        num_workers: int = 2,
        pin_memory: bool = True,
        seed: int = 0,
        pipeline: Pipeline = "torchvision",
        download: bool = False,
        verify_md5: bool = True,
    ):
        super().__init__(data_dir, batch_size, num_workers, pin_memory, seed, pipeline)
        self.download = download
        self.verify_md5 = verify_md5
        self.classes: list[str] | None = None

    @property
    def folder(self) -> Path:
        return self.data_dir / CIFAR100_FOLDER

    def _missing(self) -> list[str]:
        return [name for name in CIFAR100_MD5 if not (self.folder / name).is_file()]

    def prepare_data(self) -> None:
        if self.download and self._missing():
            from torchvision.datasets.utils import download_and_extract_archive

            download_and_extract_archive(CIFAR100_URL, str(self.data_dir), md5=CIFAR100_TGZ_MD5)

    def read_splits(self):
        missing = self._missing()
        if missing:
            raise FileNotFoundError(
                f"CIFAR-100 not found: {self.folder} lacks {', '.join(missing)} (expected the files "
                f"{', '.join(CIFAR100_MD5)} of the official python version). Set `download: true` to fetch "
                f"it, or extract {CIFAR100_URL} into {self.data_dir}."
            )
        if self.verify_md5:
            for name, expected in CIFAR100_MD5.items():
                actual = file_md5(self.folder / name)
                if actual != expected:
                    raise RuntimeError(
                        f"{self.folder / name}: MD5 {actual}, expected {expected} (the official CIFAR-100 file). "
                        "Delete it and download again, or set `verify_md5: false` to read it anyway."
                    )
        meta = load_cifar_pickle(self.folder / "meta", ("fine_label_names",))
        self.classes = list(meta["fine_label_names"])
        if len(self.classes) != self.num_classes:
            raise ValueError(
                f"{self.folder / 'meta'}: {len(self.classes)} fine_label_names, expected {self.num_classes}"
            )
        return self._read_split("train"), self._read_split("test")

    def _read_split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.folder / name
        entry = load_cifar_pickle(path, ("data", "fine_labels"))
        data, labels = entry["data"], entry["fine_labels"]
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
            raise ValueError(
                f"{path}: data {data.dtype} of shape {tuple(data.shape)} with {len(labels)} fine_labels, "
                "expected uint8 of shape (N, 3072) with N labels"
            )
        targets = torch.tensor(labels, dtype=torch.long)
        if targets.numel() and not 0 <= int(targets.min()) <= int(targets.max()) < self.num_classes:
            raise ValueError(f"{path}: fine_labels outside 0..{self.num_classes - 1}")
        return torch.tensor(data).view(-1, 3, 32, 32), targets
