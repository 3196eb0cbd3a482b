"""Fashion-MNIST (60,000 train / 10,000 test 28×28 grey images of clothing, 10 classes).

Read from the four original IDX files, gzipped or not, in either layout: a plain directory (as the
Fashion-MNIST repository ships them and Debian's ``dataset-fashion-mnist`` installs them, in
``/usr/share/datasets/fashion-mnist``) or torchvision's ``data_dir/FashionMNIST/raw/``.

Project choices: the test split is also the validation split unless ``val_fraction`` holds one out
of the training split (stratified, fixed by ``split_seed``; ``train_fraction`` keeps a stratified
share of the rest: :mod:`distill.data.splits`); training augmentation is a random crop
28 with zero padding 2 plus a horizontal flip (a mirrored garment keeps its class, unlike a digit;
``flip`` turns it off); normalisation mean 0.2860, std 0.3530 (the training set's). No MD5 check:
Debian's files are recompressed and differ from torchvision's MD5s; the magic numbers, the sizes
and gzip's CRC catch damaged files.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import torch

from .. import checks
from ..errors import BadFileError, MissingFileError
from .tensor import Pipeline, UInt8ImageDataModule

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGES_MAGIC, LABELS_MAGIC = 0x803, 0x801  # uint8 data; last byte = number of dimensions
SIDE = 28
REPLACE_HINT = "replace the file with an intact copy (delete it and set `download: true`, or reinstall the dataset)"


def read_idx(path: Path, magic: int) -> torch.Tensor:
    """One IDX file of unsigned bytes (gzipped when its name ends in ``.gz``) as a uint8 tensor."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            data = bytearray(f.read())
    except (OSError, EOFError, zlib.error) as error:  # a damaged .gz raises any of the three
        raise BadFileError(f"{path}: unreadable ({error}); {REPLACE_HINT}") from error
    ndim = magic & 0xFF
    header = 4 * (1 + ndim)
    found = int.from_bytes(data[:4], "big")
    if len(data) < header or found != magic:
        raise BadFileError(f"{path}: magic number {found:#010x}, expected {magic:#010x}; {REPLACE_HINT}")
    shape = [int.from_bytes(data[4 * i : 4 * i + 4], "big") for i in range(1, ndim + 1)]
    expected = header + math.prod(shape)
    if len(data) != expected:
        raise BadFileError(f"{path}: {len(data)} bytes, expected {expected} for shape {shape}; {REPLACE_HINT}")
    return torch.frombuffer(data, dtype=torch.uint8, offset=header).view(shape)


class FashionMNISTDataModule(UInt8ImageDataModule):
    """Fashion-MNIST from the original IDX files, served by either uint8 pipeline (see ``cifar.py``).

    Args:
        data_dir: directory holding the four ``*-idx?-ubyte[.gz]`` files, or torchvision's root
            (holding ``FashionMNIST/raw/``).
        batch_size: per process.
        num_workers: DataLoader workers of the ``"torchvision"`` pipeline (``"device"`` uses none).
        pin_memory: pin host batches when CUDA is available.
        seed: seeds the epoch shuffles and the ``"device"`` pipeline's crops.
        pipeline: ``"torchvision"`` (per-sample, in workers) or ``"device"`` (per batch, on the device).
        pad: zero padding of the training random crop (project choice).
        flip: random horizontal flip in training (project choice).
        download: fetch the files through torchvision into ``data_dir/FashionMNIST/raw`` when missing.
        train_fraction: stratified share of the training images (after the validation hold-out) kept.
        val_fraction: stratified share of the training split held out for validation; 0 validates on
            the test split.
        split_seed: seed of both draws, independent of ``seed``: every run of a study sees the same images.
    """

    num_classes = 10
    in_chans = 1
    image_size = SIDE
    mean, std = (0.2860,), (0.3530,)

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 64,
        num_workers: int = 2,
        pin_memory: bool = True,
        seed: int = 0,
        pipeline: Pipeline = "torchvision",
        pad: int = 2,
        flip: bool = True,
        download: bool = False,
        train_fraction: float = 1.0,
        val_fraction: float = 0.0,
        split_seed: int = 0,
    ):
        super().__init__(
            data_dir, batch_size, num_workers, pin_memory, seed, pipeline, train_fraction, val_fraction, split_seed
        )
        checks.non_negative_int("FashionMNISTDataModule", "pad", pad)
        self.pad, self.flip, self.download = pad, flip, download

    @property
    def folders(self) -> tuple[Path, Path]:
        return self.data_dir, self.data_dir / "FashionMNIST" / "raw"

    def _find(self, stem: str) -> Path | None:
        for folder in self.folders:
            for path in (folder / f"{stem}.gz", folder / stem):
                if path.is_file():
                    return path
        return None

    def _missing(self) -> list[str]:
        return [stem for pair in FILES.values() for stem in pair if self._find(stem) is None]

    def prepare_data(self) -> None:
        if self.download and self._missing():
            from torchvision.datasets import FashionMNIST

            FashionMNIST(str(self.data_dir), download=True)

    def read_splits(self):
        missing = self._missing()
        if missing:
            raise MissingFileError(
                f"Fashion-MNIST not found: no {', '.join(missing)} (.gz or not) "
                f"in {' or '.join(map(str, self.folders))}. "
                "Set `download: true`, or install Debian's dataset-fashion-mnist and set "
                "`data_dir: /usr/share/datasets/fashion-mnist`."
            )
        return tuple(self._read_split(*FILES[split]) for split in ("train", "test"))

    def _read_split(self, images_stem: str, labels_stem: str) -> tuple[torch.Tensor, torch.Tensor]:
        images_path, labels_path = self._find(images_stem), self._find(labels_stem)
        images, labels = read_idx(images_path, IMAGES_MAGIC), read_idx(labels_path, LABELS_MAGIC)
        if images.shape[1:] != (SIDE, SIDE):
            raise BadFileError(f"{images_path}: images of {tuple(images.shape[1:])} pixels, expected ({SIDE}, {SIDE})")
        if len(labels) != len(images):
            raise BadFileError(f"{labels_path}: {len(labels)} labels for the {len(images)} images of {images_path}")
        if len(labels) and int(labels.max()) >= self.num_classes:
            raise BadFileError(f"{labels_path}: label {int(labels.max())}, expected 0..{self.num_classes - 1}")
        return images.unsqueeze(1), labels.long()
