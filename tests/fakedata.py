"""Tiny fake datasets in the real on-disk formats, for tests without downloads.

Each writer fills ``root`` and returns the directory to pass as a DataModule's ``data_dir``.
Pixels and labels are drawn from ``numpy.random.default_rng(seed)``; every class appears.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def write_fake_cifar100(root: Path, per_class_train: int = 2, per_class_test: int = 1, seed: int = 0) -> Path:
    """``root/cifar-100-python/{train,test,meta}`` as the official python version (pickled dicts). Returns ``root``."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for split, per_class in (("train", per_class_train), ("test", per_class_test)):
        fine = np.repeat(np.arange(100), per_class)
        rng.shuffle(fine)
        entry = {
            "filenames": [f"fake_{split}_{i}.png" for i in range(len(fine))],
            "batch_label": f"{split} batch 1 of 1",
            "fine_labels": fine.tolist(),
            "coarse_labels": (fine // 5).tolist(),
            "data": rng.integers(0, 256, (len(fine), 3 * 32 * 32), dtype=np.uint8),
        }
        (folder / split).write_bytes(pickle.dumps(entry, protocol=2))
    meta = {
        "fine_label_names": [f"fine_{i}" for i in range(100)],
        "coarse_label_names": [f"coarse_{i}" for i in range(20)],
    }
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return Path(root)


def write_fake_image_folder(
    root: Path,
    num_classes: int = 3,
    per_class_train: int = 3,
    per_class_val: int = 2,
    size: int | tuple[int, int] = 40,
    seed: int = 0,
    suffix: str = ".png",
) -> Path:
    """``root/{train,val}/class_K/*<suffix>``: random RGB images of ``size`` (side, or (height, width)).

    ``suffix=".JPEG"`` writes JPEGs (quality 90) of smooth random content, as photographs compress.
    Returns ``root``.
    """
    rng = np.random.default_rng(seed)
    height, width = (size, size) if isinstance(size, int) else size
    for split, per_class in (("train", per_class_train), ("val", per_class_val)):
        for k in range(num_classes):
            folder = Path(root) / split / f"class_{k}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                if suffix == ".png":
                    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / f"{i}.png")
                else:
                    coarse = Image.fromarray(
                        rng.integers(0, 256, (max(height // 16, 2), max(width // 16, 2), 3), dtype=np.uint8)
                    )
                    coarse.resize((width, height), Image.BICUBIC).save(folder / f"{i}{suffix}", "JPEG", quality=90)
    return Path(root)


def idx_bytes(array: np.ndarray) -> bytes:
    """An uint8 array in the IDX format: magic 0x0000 08 NDIM, big-endian int32 sizes, then the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_fake_fashion_mnist(
    root: Path,
    n_train: int = 20,
    n_test: int = 10,
    torchvision_layout: bool = False,
    gzipped: bool = True,
    seed: int = 0,
) -> Path:
    """The four Fashion-MNIST IDX files: directly in ``root`` (as Debian installs them), or in
    ``root/FashionMNIST/raw`` (torchvision's layout); ``.gz`` unless ``gzipped=False``. Returns ``root``."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "FashionMNIST" / "raw" if torchvision_layout else Path(root)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            data = idx_bytes(array.astype(np.uint8))
            name = f"{prefix}-{kind}-ubyte"
            if gzipped:
                (folder / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
    return Path(root)
