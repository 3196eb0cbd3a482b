"""The dataset DataModules on tiny fake files in the real formats (see fakedata.py)."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from fakedata import write_fake_cifar100, write_fake_fashion_mnist, write_fake_image_folder
from sklearn.datasets import load_digits

from distill.data.cifar import CIFAR100_MD5, CIFAR100_MEAN, CIFAR100_STD, CIFAR100DataModule
from distill.data.digits import DigitsDataModule
from distill.data.fashion_mnist import FashionMNISTDataModule
from distill.data.imagenet import ImageNetDataModule
from distill.data.splits import train_val_indices
from distill.errors import BadFileError

PIPELINES = ["torchvision", "device"]


def cifar(root: Path, **kwargs) -> CIFAR100DataModule:
    kwargs = {"verify_md5": False, "num_workers": 0, "batch_size": 16, **kwargs}
    return CIFAR100DataModule(data_dir=str(root), **kwargs)


def attach(dm, training: bool, step: int = 0, rank: int = 0) -> None:
    """Stand-in for the Trainer fields the device pipeline reads."""
    dm.trainer = SimpleNamespace(training=training, global_step=step, global_rank=rank)


def normalised(raw: torch.Tensor, mean, std) -> torch.Tensor:
    mean, std = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    return (raw.float() / 255 - mean) / std


# --- CIFAR-100 ---------------------------------------------------------------------------------------


def test_cifar_md5s_are_torchvisions():
    from torchvision.datasets import CIFAR100

    official = dict(CIFAR100.train_list + CIFAR100.test_list)
    official[CIFAR100.meta["filename"]] = CIFAR100.meta["md5"]
    assert CIFAR100_MD5 == official


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_cifar_eval_batch_is_the_normalised_file_content(tmp_path, pipeline):
    dm = cifar(write_fake_cifar100(tmp_path), pipeline=pipeline)
    dm.setup("fit")
    assert len(dm.train_set) == 200 and len(dm.test_set) == 100 and dm.classes[3] == "fine_3"
    images, targets, index = dm.on_after_batch_transfer(next(iter(dm.test_dataloader())), 0)
    entry = pickle.loads((tmp_path / "cifar-100-python" / "test").read_bytes(), encoding="latin1")
    raw = torch.from_numpy(entry["data"][:16]).view(16, 3, 32, 32)
    assert images.dtype == torch.float32 and images.shape == (16, 3, 32, 32)
    torch.testing.assert_close(images, normalised(raw, CIFAR100_MEAN, CIFAR100_STD))
    assert targets.tolist() == entry["fine_labels"][:16] and index.tolist() == list(range(16))
    train = pickle.loads((tmp_path / "cifar-100-python" / "train").read_bytes(), encoding="latin1")
    assert dm.train_targets.tolist() == train["fine_labels"]


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_cifar_train_batch(tmp_path, pipeline):
    dm = cifar(write_fake_cifar100(tmp_path), pipeline=pipeline)
    dm.setup("fit")
    attach(dm, training=True)
    batch = next(iter(dm.train_dataloader()))
    if pipeline == "device":
        assert batch[0].dtype == torch.uint8  # what crosses to the device
    images, targets, index = dm.on_after_batch_transfer(batch, 0)
    assert images.dtype == torch.float32 and images.shape == (16, 3, 32, 32)
    low, high = normalised(torch.tensor([0, 255]).view(2, 1, 1, 1).expand(2, 3, 1, 1), CIFAR100_MEAN, CIFAR100_STD)
    assert (images >= low - 1e-5).all() and (images <= high + 1e-5).all()
    assert index.unique().numel() == 16 and torch.equal(targets, dm.train_targets[index])


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_cifar_pads_with_black_before_normalising(tmp_path, pipeline):
    dm = cifar(write_fake_cifar100(tmp_path, per_class_train=1), pipeline=pipeline)
    white = torch.full((256, 3, 32, 32), 255, dtype=torch.uint8)
    if pipeline == "device":
        attach(dm, training=True)
        images = dm.on_after_batch_transfer((white, torch.zeros(256), torch.arange(256)), 0)[0]
    else:
        transform = dm.transform(train=True)
        images = torch.stack([transform(image) for image in white])
    extremes = torch.tensor([0, 255]).view(2, 1, 1, 1).expand(2, 3, 1, 1)
    black_px, white_px = normalised(extremes, CIFAR100_MEAN, CIFAR100_STD)
    is_black = torch.isclose(images, black_px.expand_as(images))
    assert (is_black | torch.isclose(images, white_px.expand_as(images))).all()
    assert 0.05 < is_black.float().mean() < 0.3  # E[padding share] = 1 - (1 - E|d - 4|/32)² ≈ 13%


def marked_positions(dm, steps: int, n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column where one marked pixel (5, 5) lands after the device augmentation, per draw."""
    images = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    images[:, :, 5, 5] = 255
    rows, cols = [], []
    for step in range(steps):
        attach(dm, training=True, step=step)
        out = dm.on_after_batch_transfer((images, torch.zeros(n), torch.arange(n)), 0)[0][:, 0]
        flat = out.flatten(1).argmax(1)
        rows.append(flat // 32)
        cols.append(flat % 32)
    return torch.cat(rows), torch.cat(cols)


def test_device_crops_are_a_function_of_seed_step_and_rank(tmp_path):
    """The same step redraws the same crops (exact resume); DDP ranks and other steps draw their own."""
    dm = cifar(tmp_path, pipeline="device")
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)

    def augmented(step: int, rank: int) -> torch.Tensor:
        attach(dm, training=True, step=step, rank=rank)
        return dm.on_after_batch_transfer((images, torch.zeros(64), torch.arange(64)), 0)[0]

    assert torch.equal(augmented(3, 0), augmented(3, 0))
    assert not torch.equal(augmented(3, 0), augmented(3, 1))
    assert not torch.equal(augmented(3, 0), augmented(4, 0))


def chi_square_uniform(values: torch.Tensor, k: int) -> float:
    counts = torch.bincount(values, minlength=k).double()
    assert len(counts) == k
    expected = len(values) / k
    return float(((counts - expected) ** 2 / expected).sum())


def test_device_crop_offsets_uniform_and_flip_half(tmp_path):
    dm = cifar(tmp_path, pipeline="device", seed=1)
    rows, cols = marked_positions(dm, steps=16)
    # Padded by 4, the pixel sits at (9, 9): an offset d moves it to 9 - d, a flip mirrors the column.
    flipped = cols >= 16
    dy = 9 - rows
    dx = torch.where(flipped, cols - 22, 9 - cols)
    assert dy.min() == 0 and dy.max() == 8 and dx.min() == 0 and dx.max() == 8
    assert chi_square_uniform(dy, 9) < 26.1 and chi_square_uniform(dx, 9) < 26.1  # χ²(8), p = 0.001
    assert abs(flipped.float().mean().item() - 0.5) < 0.03  # 4096 draws: sd 0.008


def test_device_crops_depend_only_on_seed_and_step(tmp_path):
    dm = cifar(tmp_path, pipeline="device", seed=3)
    first = marked_positions(dm, steps=2)
    assert all(torch.equal(a, b) for a, b in zip(first, marked_positions(dm, steps=2)))
    other_seed = marked_positions(cifar(tmp_path, pipeline="device", seed=4), steps=2)
    assert not torch.equal(first[1], other_seed[1])
    assert not torch.equal(first[0][:256], first[0][256:])  # steps differ


def test_cifar_missing_files_error_names_directory_files_and_remedy(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        cifar(tmp_path).setup()
    message = str(error.value)
    assert str(tmp_path / "cifar-100-python") in message
    assert all(name in message for name in ("train", "test", "meta", "download: true", "cifar-100-python.tar.gz"))


def test_cifar_checksum_mismatch_names_file_and_hashes(tmp_path):
    write_fake_cifar100(tmp_path)
    with pytest.raises(BadFileError) as error:
        cifar(tmp_path, verify_md5=True).setup()
    message = str(error.value)
    assert str(tmp_path / "cifar-100-python" / "train") in message and CIFAR100_MD5["train"] in message
    assert f"MD5 {hashlib.md5((tmp_path / 'cifar-100-python' / 'train').read_bytes()).hexdigest()}" in message


class Payload:
    def __reduce__(self):
        return (os.getcwd, ())


def test_cifar_reader_runs_no_code_reads_python2_arrays_and_names_missing_keys(tmp_path):
    write_fake_cifar100(tmp_path)
    train = tmp_path / "cifar-100-python" / "train"
    # The official files name numpy's array rebuilder by its numpy 1 path.
    train.write_bytes(train.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    cifar(tmp_path).setup()
    (tmp_path / "cifar-100-python" / "meta").write_bytes(pickle.dumps({"fine_label_names": Payload()}, protocol=2))
    with pytest.raises(BadFileError, match=r"meta: not a CIFAR python-format file \(refusing to load .*getcwd"):
        cifar(tmp_path).setup()
    (tmp_path / "cifar-100-python" / "meta").write_bytes(pickle.dumps({"label_names": []}))
    with pytest.raises(BadFileError, match=r"meta: not a CIFAR python-format file \(no fine_label_names\)"):
        cifar(tmp_path).setup()


class Recorder(pl.LightningModule):
    """Checks the batches that reach the step functions."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3 * 32 * 32, 100)
        self.seen = []

    def training_step(self, batch, batch_idx):
        images, targets, index = batch
        self.seen.append((images.dtype, tuple(images.shape), self.trainer.training))
        return torch.nn.functional.cross_entropy(self.layer(images.flatten(1)), targets)

    def validation_step(self, batch, batch_idx):
        self.seen.append((batch[0].dtype, tuple(batch[0].shape), self.trainer.training))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_cifar_trains_under_lightning(tmp_path, pipeline):
    dm = cifar(write_fake_cifar100(tmp_path), pipeline=pipeline)
    model = Recorder()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    assert model.seen[:2] == [(torch.float32, (16, 3, 32, 32), True)] * 2
    assert (torch.float32, (16, 3, 32, 32), False) in model.seen


# --- ImageNet (ImageFolder) --------------------------------------------------------------------------


def imagenet(root: Path, **kwargs) -> ImageNetDataModule:
    kwargs = {"image_size": 32, "num_classes": 3, "num_workers": 0, "batch_size": 4, **kwargs}
    return ImageNetDataModule(data_dir=str(root), **kwargs)


def test_imagenet_batches(tmp_path):
    dm = imagenet(write_fake_image_folder(tmp_path))
    dm.setup("fit")
    assert len(dm.train_set) == 9 and len(dm.val_set) == 6 and dm.test_set is dm.val_set
    assert dm.train_targets.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        images, targets, index = next(iter(loader))
        assert images.dtype == torch.float32 and images.shape == (4, 3, 32, 32)
        assert targets.dtype == torch.long and index.shape == (4,)
        assert -2.2 < images.min() and images.max() < 2.7  # ImageNet-normalised [0, 1]
    assert dm.transform(train=False).transforms[0].size == 37  # 32 · 256 / 224


def test_imagenet_errors_name_the_directory(tmp_path):
    write_fake_image_folder(tmp_path)
    with pytest.raises(ValueError, match=r"3 class folders, expected num_classes=1000"):
        imagenet(tmp_path, num_classes=1000).setup()
    (tmp_path / "val" / "class_2").rename(tmp_path / "val" / "class_9")
    with pytest.raises(ValueError, match=r"different class folders .*\['class_2'\].*\['class_9'\]"):
        imagenet(tmp_path).setup()
    for png in (tmp_path / "val" / "class_9").iterdir():
        png.unlink()
    empty = re.escape(f"{tmp_path / 'val'}: class folder(s) class_9 hold no image")
    with pytest.raises(FileNotFoundError, match=empty):
        imagenet(tmp_path).setup()
    (tmp_path / "val").rename(tmp_path / "test")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'val'} is not a directory")):
        imagenet(tmp_path).setup()


# --- Fashion-MNIST -----------------------------------------------------------------------------------


def idx_payload(path: Path, header: int) -> np.ndarray:
    data = path.read_bytes()
    return np.frombuffer(gzip.decompress(data) if path.suffix == ".gz" else data, dtype=np.uint8)[header:]


@pytest.mark.parametrize("torchvision_layout", [False, True])
@pytest.mark.parametrize("gzipped", [True, False])
def test_fashion_mnist_reads_both_layouts(tmp_path, torchvision_layout, gzipped):
    write_fake_fashion_mnist(tmp_path, torchvision_layout=torchvision_layout, gzipped=gzipped)
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), num_workers=0)
    dm.setup()
    folder = tmp_path / "FashionMNIST" / "raw" if torchvision_layout else tmp_path
    suffix = ".gz" if gzipped else ""
    images = idx_payload(folder / f"t10k-images-idx3-ubyte{suffix}", 16).reshape(10, 1, 28, 28)
    labels = idx_payload(folder / f"t10k-labels-idx1-ubyte{suffix}", 8)
    assert torch.equal(dm.test_set.images, torch.from_numpy(images.copy()))
    assert dm.test_set.targets.tolist() == labels.tolist() and len(dm.train_set) == 20


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_fashion_mnist_batches(tmp_path, pipeline):
    root = write_fake_fashion_mnist(tmp_path)
    dm = FashionMNISTDataModule(data_dir=str(root), num_workers=0, batch_size=8, pipeline=pipeline)
    dm.setup()
    images, _, _ = dm.on_after_batch_transfer(next(iter(dm.test_dataloader())), 0)
    torch.testing.assert_close(images, normalised(dm.test_set.images[:8], (0.2860,), (0.3530,)))
    attach(dm, training=True)
    images, targets, index = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert images.dtype == torch.float32 and images.shape == (8, 1, 28, 28)
    assert torch.equal(targets, dm.train_targets[index])


def test_fashion_mnist_errors_name_the_file(tmp_path):
    where = re.escape(f"in {tmp_path} or {tmp_path}/FashionMNIST/raw")
    with pytest.raises(FileNotFoundError, match=r"no train-images-idx3-ubyte.*" + where):
        FashionMNISTDataModule(data_dir=str(tmp_path)).setup()
    write_fake_fashion_mnist(tmp_path)
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + gzip.decompress(labels.read_bytes())[4:]))
    with pytest.raises(ValueError, match=re.escape(f"{labels}: magic number 0x00000803, expected 0x00000801")):
        FashionMNISTDataModule(data_dir=str(tmp_path)).setup()
    write_fake_fashion_mnist(tmp_path)
    labels.write_bytes(gzip.compress(gzip.decompress(labels.read_bytes())[:-1]))
    with pytest.raises(ValueError, match=re.escape(f"{labels}: 27 bytes, expected 28 for shape [20]")):
        FashionMNISTDataModule(data_dir=str(tmp_path)).setup()
    write_fake_fashion_mnist(tmp_path, n_train=19)
    write_fake_fashion_mnist(tmp_path / "more", n_train=20)
    labels.write_bytes((tmp_path / "more" / labels.name).read_bytes())
    with pytest.raises(ValueError, match=re.escape(f"{labels}: 20 labels for the 19 images")):
        FashionMNISTDataModule(data_dir=str(tmp_path)).setup()
    labels.write_bytes(labels.read_bytes()[:-9])
    with pytest.raises(ValueError, match=re.escape(f"{labels}: unreadable")):
        FashionMNISTDataModule(data_dir=str(tmp_path)).setup()


DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.slow
@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_real_files_match_the_protocol_statistics():
    dm = FashionMNISTDataModule(data_dir=str(DEBIAN_FASHION_MNIST))
    dm.setup()
    pixels = dm.train_set.images.float() / 255
    assert len(dm.train_set) == 60000 and len(dm.test_set) == 10000
    assert round(pixels.mean().item(), 4) == 0.2860 and round(pixels.std().item(), 4) == 0.3530
    assert dm.train_targets.bincount().tolist() == [6000] * 10


# --- Fractions and held-out validation (distill.data.splits) --------------------------------------


def uneven_labels() -> torch.Tensor:
    """Classes of 40, 25 and 11 images, interleaved."""
    labels = torch.cat([torch.full((40,), 0), torch.full((25,), 1), torch.full((11,), 2)])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(3))]


def test_train_val_indices_are_stratified_disjoint_and_sorted():
    labels = uneven_labels()
    train, val = train_val_indices(labels, val_fraction=0.2, train_fraction=0.5, split_seed=0)
    # per class: val = round(n·0.2); train = round((n - val)·0.5), counted by hand
    assert labels[val].bincount().tolist() == [8, 5, 2]
    assert labels[train].bincount().tolist() == [16, 10, 4]
    assert not set(train.tolist()) & set(val.tolist())
    assert train.tolist() == sorted(train.tolist()) and val.tolist() == sorted(val.tolist())


def test_train_val_indices_are_fixed_by_split_seed_and_nested():
    labels = uneven_labels()
    first = train_val_indices(labels, 0.2, 0.5, split_seed=0)
    assert all(torch.equal(a, b) for a, b in zip(first, train_val_indices(labels, 0.2, 0.5, split_seed=0)))
    other = train_val_indices(labels, 0.2, 0.5, split_seed=1)
    assert not torch.equal(first[1], other[1])
    full_train, same_val = train_val_indices(labels, 0.2, 1.0, split_seed=0)
    assert torch.equal(same_val, first[1])  # the validation split does not depend on train_fraction
    assert set(first[0].tolist()) < set(full_train.tolist())  # a smaller fraction is a subset of a larger one
    assert set(full_train.tolist()) | set(same_val.tolist()) == set(range(len(labels)))
    whole, none = train_val_indices(labels, 0.0, 1.0, split_seed=0)
    assert whole.tolist() == list(range(len(labels))) and none.numel() == 0


def test_train_val_indices_errors_name_the_fraction_and_the_class():
    labels = uneven_labels()
    with pytest.raises(ValueError, match=re.escape("val_fraction=1.0: expected a fraction in [0, 1)")):
        train_val_indices(labels, 1.0, 1.0, 0)
    with pytest.raises(ValueError, match=re.escape("train_fraction=0: expected a fraction in (0, 1]")):
        train_val_indices(labels, 0.0, 0, 0)
    message = "FashionMNISTDataModule val_fraction=-0.1: expected a fraction in [0, 1)"
    with pytest.raises(ValueError, match=re.escape(message)):
        FashionMNISTDataModule(val_fraction=-0.1)
    with pytest.raises(ValueError, match=r"class 2 has 11 training images, leaving 0 for validation and 0 for"):
        train_val_indices(labels, 0.03, 0.03, 0)


def fashion(root: Path, **kwargs) -> FashionMNISTDataModule:
    dm = FashionMNISTDataModule(data_dir=str(root), num_workers=0, **kwargs)
    dm.setup()
    return dm


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_fashion_mnist_holds_out_validation_and_keeps_a_fraction(tmp_path, pipeline):
    root = write_fake_fashion_mnist(tmp_path, n_train=60)
    whole = fashion(root, pipeline=pipeline)
    dm = fashion(root, pipeline=pipeline, val_fraction=1 / 3, train_fraction=0.5)
    assert not whole.holds_out_validation and whole.val_set is whole.test_set
    assert dm.holds_out_validation and dm.test_set.targets.tolist() == whole.test_set.targets.tolist()
    assert dm.val_set.targets.bincount().tolist() == [2] * 10 and dm.train_targets.bincount().tolist() == [2] * 10
    # every held-out and kept image is a training image, and no image is in both
    pixels = {tuple(image.flatten().tolist()): i for i, image in enumerate(whole.train_set.images)}
    val = [pixels[tuple(image.flatten().tolist())] for image in dm.val_set.images]
    kept = [pixels[tuple(image.flatten().tolist())] for image in dm.train_set.images]
    assert not set(val) & set(kept) and len(set(val)) == 20 and len(set(kept)) == 20
    # validation batches are test-transformed: normalised, not cropped or flipped
    attach(dm, training=False)
    images, targets, index = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    torch.testing.assert_close(images, normalised(dm.val_set.images[index], (0.2860,), (0.3530,)))


def test_fashion_mnist_subset_is_the_same_for_every_run_seed(tmp_path):
    root = write_fake_fashion_mnist(tmp_path, n_train=60)
    a, b = (fashion(root, seed=seed, val_fraction=0.2, train_fraction=0.5) for seed in (0, 7))
    assert torch.equal(a.train_set.images, b.train_set.images) and torch.equal(a.val_set.images, b.val_set.images)
    c = fashion(root, seed=0, val_fraction=0.2, train_fraction=0.5, split_seed=1)
    assert not torch.equal(a.val_set.images, c.val_set.images)


def test_cifar_holds_out_validation(tmp_path):
    dm = cifar(write_fake_cifar100(tmp_path, per_class_train=4), val_fraction=0.25, train_fraction=0.5)
    dm.setup()
    assert len(dm.val_set) == 100 and len(dm.train_set) == 200 and len(dm.test_set) == 100
    assert dm.val_set.targets.bincount().tolist() == [1] * 100


def test_digits_validation_comes_out_of_the_training_split():
    whole = DigitsDataModule(train_fraction=0.1)
    held = DigitsDataModule(train_fraction=0.1, val_fraction=0.2)
    whole.setup(), held.setup()
    # per class: test = round(0.2·n), val = round(0.2·(n − test)), train = round(0.1·(n − test − val))
    counts = torch.bincount(torch.tensor(load_digits().target))
    test = [round(0.2 * n) for n in counts.tolist()]
    val = [round(0.2 * (n - t)) for n, t in zip(counts.tolist(), test)]
    assert whole.val_set is whole.test_set and len(whole.test_set) == sum(test) == 359
    assert whole.train_targets.bincount().tolist() == [round(0.1 * (n - t)) for n, t in zip(counts.tolist(), test)]
    assert held.val_set is not held.test_set and held.val_set.targets.bincount().tolist() == val
    assert held.train_targets.bincount().tolist() == [
        round(0.1 * (n - t - v)) for n, t, v in zip(counts.tolist(), test, val)
    ]
    assert torch.equal(held.test_set.images, whole.test_set.images)
    test_images = {tuple(x.flatten().tolist()) for x in whole.test_set.images}
    assert not test_images & {tuple(x.flatten().tolist()) for x in held.val_set.images}
