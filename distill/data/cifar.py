"""CIFAR-100 from the official python-format files.

Protocol (CRD benchmark): train = random crop 32 with zero padding 4 + horizontal flip +
normalisation; test = normalisation only; the test split is also the validation split. Options
outside the protocol: ``val_fraction`` holds a validation split out of the training split and
``train_fraction`` keeps a stratified share of the rest (low-data distillation;
:mod:`distill.data.splits`).

Either pipeline of :mod:`distill.data.tensor` (``pipeline`` argument) applies the same protocol.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import torch

from ..errors import BadFileError, MissingFileError
from .tensor import Pipeline, UInt8ImageDataModule

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
REEXTRACT = f"replace it with the file of the official archive {CIFAR100_URL}"


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
            raise BadFileError(f"{path}: not a CIFAR python-format file ({error}); {REEXTRACT}") from error
    missing = [key for key in keys if not isinstance(entry, dict) or key not in entry]
    if missing:
        raise BadFileError(f"{path}: not a CIFAR python-format file (no {', '.join(missing)}); {REEXTRACT}")
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
        train_fraction: stratified share of the training images (after the validation hold-out) kept.
        val_fraction: stratified share of the training split held out for validation; 0 (the
            protocol) validates on the test split.
        split_seed: seed of both draws, independent of ``seed``: every run of a study sees the same images.
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
        train_fraction: float = 1.0,
        val_fraction: float = 0.0,
        split_seed: int = 0,
    ):
        super().__init__(
            data_dir, batch_size, num_workers, pin_memory, seed, pipeline, train_fraction, val_fraction, split_seed
        )
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
            raise MissingFileError(
                f"CIFAR-100 not found: {self.folder} lacks {', '.join(missing)} (expected the files "
                f"{', '.join(CIFAR100_MD5)} of the official python version). Set `download: true` to fetch "
                f"it, or extract {CIFAR100_URL} into {self.data_dir}."
            )
        if self.verify_md5:
            for name, expected in CIFAR100_MD5.items():
                actual = file_md5(self.folder / name)
                if actual != expected:
                    raise BadFileError(
                        f"{self.folder / name}: MD5 {actual}, expected {expected} (the official CIFAR-100 file). "
                        "Delete it and download again, or set `verify_md5: false` to read it anyway."
                    )
        meta = load_cifar_pickle(self.folder / "meta", ("fine_label_names",))
        self.classes = list(meta["fine_label_names"])
        if len(self.classes) != self.num_classes:
            raise BadFileError(
                f"{self.folder / 'meta'}: {len(self.classes)} fine_label_names, expected {self.num_classes}"
            )
        return self._read_split("train"), self._read_split("test")

    def _read_split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.folder / name
        entry = load_cifar_pickle(path, ("data", "fine_labels"))
        data, labels = entry["data"], entry["fine_labels"]
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
            raise BadFileError(
                f"{path}: data {data.dtype} of shape {tuple(data.shape)} with {len(labels)} fine_labels, "
                "expected uint8 of shape (N, 3072) with N labels"
            )
        targets = torch.tensor(labels, dtype=torch.long)
        if targets.numel() and not 0 <= int(targets.min()) <= int(targets.max()) < self.num_classes:
            raise BadFileError(f"{path}: fine_labels outside 0..{self.num_classes - 1}; {REEXTRACT}")
        return torch.tensor(data).view(-1, 3, 32, 32), targets
