"""ImageNet's three decode paths (pil, tensor, device) on a tiny JPEG tree: same images, same protocol."""

from __future__ import annotations

import io
import math
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from fakedata import write_fake_image_folder
from helpers import FAST
from PIL import Image
from rank_dump import assert_same_tensors, run_two_ranks
from test_data import Recorder
from torchvision.transforms import v2

from distill.data.augment import random_resized_crop_boxes, step_generator
from distill.data.imagenet import IMAGENET_MEAN, IMAGENET_STD, ImageNetDataModule
from distill.data.jpeg import decode_to, jpeg_components, read_for_device

DECODES = ["pil", "tensor", "device"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return write_fake_image_folder(tmp_path_factory.mktemp("jpeg"), size=(75, 100), suffix=".JPEG")


def imagenet(root: Path, decode: str, **kwargs) -> ImageNetDataModule:
    kwargs = {"image_size": 32, "num_classes": 3, "num_workers": 0, "batch_size": 6, **kwargs}
    dm = ImageNetDataModule(data_dir=str(root), decode=decode, **kwargs)
    dm.setup("fit")
    return dm


def batch(dm: ImageNetDataModule, training: bool, step: int = 0):
    """The first batch as a training step receives it, without a Trainer."""
    dm.trainer = SimpleNamespace(training=training, global_step=step)
    raw = next(iter(dm.train_dataloader() if training else dm.val_dataloader()))
    return dm.on_after_batch_transfer(dm.transfer_batch_to_device(raw, torch.device("cpu"), 0), 0)


def jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **kwargs)
    return buffer.getvalue()


def test_jpeg_components_read_from_the_frame_header():
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    assert jpeg_components(jpeg_bytes(rgb)) == 3
    assert jpeg_components(jpeg_bytes(rgb, progressive=True)) == 3
    assert jpeg_components(jpeg_bytes(rgb.convert("L"))) == 1
    assert jpeg_components(jpeg_bytes(rgb.convert("CMYK"))) == 4
    png = io.BytesIO()
    rgb.save(png, "PNG")
    assert jpeg_components(png.getvalue()) is None
    assert jpeg_components(b"\xff\xd8\xff") is None


def test_workers_send_bytes_only_for_jpegs_the_device_decodes(tmp_path):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (6, 9, 3), dtype=np.uint8))
    files = {
        "rgb.JPEG": jpeg_bytes(rgb),
        "grey.JPEG": jpeg_bytes(rgb.convert("L")),
        "cmyk.JPEG": jpeg_bytes(rgb.convert("CMYK")),
    }
    png = io.BytesIO()
    rgb.save(png, "PNG")
    files["png.JPEG"] = png.getvalue()  # ImageNet's training set holds a PNG named .JPEG
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    items = {name: read_for_device(str(tmp_path / name)) for name in files}
    assert items["rgb.JPEG"].tolist() == list(files["rgb.JPEG"])
    assert items["grey.JPEG"].dim() == 1
    assert items["cmyk.JPEG"].shape == items["png.JPEG"].shape == (3, 6, 9)
    images = decode_to(list(items.values()), torch.device("cpu"))
    assert [tuple(image.shape) for image in images] == [(3, 6, 9)] * 4
    assert all(image.dtype == torch.uint8 for image in images)
    assert torch.equal(images[3], torch.from_numpy(np.array(rgb)).permute(2, 0, 1))  # PNG: lossless


@pytest.mark.parametrize("decode", DECODES)
def test_every_path_yields_protocol_batches(tree, decode):
    dm = imagenet(tree, decode)
    for training in (True, False):
        images, targets, index = batch(dm, training)
        assert images.dtype == torch.float32 and images.shape == (6, 3, 32, 32)
        assert targets.tolist() == [int(dm.train_targets[i]) if training else dm.val_set.targets[i] for i in index]
        assert -2.2 < images.min() and images.max() < 2.7  # ImageNet-normalised [0, 1]


def test_eval_batches_agree_across_paths(tree):
    pil, tensor, device = (batch(imagenet(tree, decode), training=False)[0] for decode in DECODES)
    assert torch.allclose(tensor, device, atol=1e-6)  # the same decoder and the same tensor resize
    one_level = 1 / 255 / min(IMAGENET_STD)  # PIL and tensor resizing round differently, by one level
    assert (pil - tensor).abs().max() <= 2 * one_level
    assert (pil - tensor).abs().mean() < 0.1 * one_level


def test_device_crops_are_torchvision_crops_of_the_drawn_boxes(tree):
    dm = imagenet(tree, "device")
    images, _, index = batch(dm, training=True, step=7)
    again, _, _ = batch(dm, training=True, step=7)
    other, _, _ = batch(dm, training=True, step=8)
    assert torch.equal(images, again) and not torch.equal(images, other)  # a function of (seed, step)

    generator = step_generator(dm.seed, 7, torch.device("cpu"))
    boxes = random_resized_crop_boxes(torch.tensor([[75, 100]] * 6), generator)
    flips = torch.rand(6, generator=generator) < 0.5
    tensor = imagenet(tree, "tensor")
    for image, i, box, flip in zip(images, index.tolist(), boxes.tolist(), flips):
        decoded = tensor.train_set.dataset.loader(tensor.train_set.dataset.samples[i][0])
        crop = v2.functional.resized_crop(decoded, *box, [32, 32], antialias=True)
        expected = (crop.flip(-1) if flip else crop).float().div(255)
        unnormalised = image * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        assert torch.allclose(unnormalised, expected, atol=1e-5)


@pytest.mark.slow
def test_crop_boxes_follow_torchvision_random_resized_crop():
    n, (height, width) = 20000, (375, 500)
    ours = random_resized_crop_boxes(torch.tensor([[height, width]] * n), torch.Generator().manual_seed(0)).double()
    torch.manual_seed(0)
    theirs = torch.tensor(
        [v2.RandomResizedCrop.get_params(torch.empty(1, height, width), [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)],
        dtype=torch.float64,
    )
    for boxes in (ours, theirs):
        top, left, h, w = boxes.T
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    stats = [
        lambda b: (b[:, 2] * b[:, 3]).mean() / (height * width),  # area fraction (0.54 uniform, less clipped)
        lambda b: (b[:, 3] / b[:, 2]).log().mean(),  # log aspect ratio
        lambda b: (b[:, 3] / b[:, 2]).log().std(),
        lambda b: b[:, 0].mean() / height,  # offsets
        lambda b: b[:, 1].mean() / width,
    ]
    for stat in stats:
        assert abs(float(stat(ours) - stat(theirs))) < 0.01
    assert abs(math.log(4 / 3) - float((ours[:, 3] / ours[:, 2]).log().abs().max())) < 0.02  # full ratio range


@pytest.mark.parametrize("height, width", [(10, 1000), (1000, 10)])
def test_crop_boxes_fall_back_to_torchvision_centre_crop(height, width):
    """Where no draw can fit (extreme aspect ratios), the box is torchvision's deterministic fallback."""
    expected = v2.RandomResizedCrop.get_params(torch.empty(1, height, width), [0.08, 1.0], [3 / 4, 4 / 3])
    boxes = random_resized_crop_boxes(torch.tensor([[height, width]] * 3), torch.Generator().manual_seed(1))
    assert boxes.tolist() == [list(expected)] * 3


def test_bad_files_are_named(tmp_path):
    root = write_fake_image_folder(tmp_path, size=(30, 40), suffix=".JPEG")
    broken = root / "train" / "class_1" / "0.JPEG"
    broken.write_bytes(broken.read_bytes()[:300])  # truncated after the headers
    dm = imagenet(root, "device", batch_size=9)
    with pytest.raises(RuntimeError, match=re.escape(f"{broken}: cannot decode JPEG on cpu")):
        batch(dm, training=True)
    dm = imagenet(root, "tensor", batch_size=9)
    with pytest.raises(RuntimeError, match=re.escape(f"{broken}: cannot decode image")):
        batch(dm, training=True)
    with pytest.raises(ValueError, match=r"decode='nvjpeg': expected one of 'pil', 'tensor', 'device'"):
        ImageNetDataModule(data_dir=str(root), decode="nvjpeg")


@pytest.mark.parametrize("decode", ["tensor", "device"])
def test_fast_paths_train_under_lightning(tree, tmp_path, decode):
    """Lightning calls the DataModule's transfer hooks: the step sees normalised float batches."""
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
    trainer.fit(model, datamodule=imagenet(tree, decode, batch_size=4))
    assert model.seen[:2] == [(torch.float32, (4, 3, 32, 32), True)] * 2
    assert (torch.float32, (4, 3, 32, 32), False) in model.seen


def test_missing_torchcodec_says_how_to_install(tree, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchcodec", None)  # makes `import torchcodec` fail
    with pytest.raises(ImportError, match=re.escape("pip install 'distill[fast-decode]'") + ".*decode: pil"):
        ImageNetDataModule(data_dir=str(tree), decode="tensor")
    assert ImageNetDataModule(data_dir=str(tree), decode="pil").decode == "pil"


class SaveAtStep(pl.Callback):
    """Test-only: a checkpoint after training step ``step`` (as a step-interval checkpoint would write it)."""

    def __init__(self, step: int, path: Path):
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def test_device_decode_resumed_mid_epoch_equals_uninterrupted(tree, tmp_path):
    """Crops are drawn per (seed, global step) and the loader resumes at its next batch: a run resumed
    from a mid-epoch checkpoint ends with the uninterrupted run's weights."""
    from distill.methods import Supervised

    def fit(callbacks=(), ckpt_path=None):
        pl.seed_everything(0)
        model = Supervised(model="resnet8", num_classes=3, in_chans=3, image_size=32, lr=0.1)
        trainer = pl.Trainer(
            accelerator="cpu",
            max_epochs=2,
            limit_val_batches=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
            callbacks=list(callbacks),
        )
        trainer.fit(model, datamodule=imagenet(tree, "device", batch_size=4), ckpt_path=ckpt_path)
        return model.state_dict()

    middle = tmp_path / "middle.ckpt"
    straight = fit([SaveAtStep(4, middle)])  # 3 batches an epoch (9 images): after batch 1 of epoch 2
    assert torch.load(middle, weights_only=True)["ImageNetDataModule"] == {"train_position": {"epoch": 1, "batches": 1}}
    resumed = fit(ckpt_path=middle)
    for name, value in straight.items():
        assert torch.equal(value, resumed[name]), name


@pytest.mark.ddp
def test_two_process_ddp_with_device_decode_keeps_ranks_identical(tree, tmp_path):
    """Each rank decodes and crops its own share on its own device (here the CPU); the weights agree."""
    args = [
        "fit",
        "--model=distill.methods.Supervised",
        "--model.model=resnet8",
        "--data=distill.data.ImageNetDataModule",
        f"--data.data_dir={tree}",
        "--data.image_size=32",
        "--data.num_classes=3",
        "--data.decode=device",
        "--data.num_workers=0",
        "--data.batch_size=2",
        "--trainer.max_epochs=2",
        *FAST,
    ]
    rank0, rank1 = run_two_ranks(args, tmp_path)
    assert_same_tensors(rank0, rank1)
    assert "model.fc.weight" in rank0
