"""Seconds per CIFAR-100 epoch of KD resnet32x4 -> resnet8x4 (batch 64, device pipeline), projected to 240 epochs.

``distill`` side: ``CIFAR100DataModule(pipeline="device")`` over fake CIFAR-100 files of the real
size (50,000 training and 10,000 test images) and an :class:`~distill.methods.OfflineKD` module in
``Trainer.fit`` with CSV logging; an epoch is timed from ``on_train_epoch_start`` to
``on_train_epoch_end`` (training plus validation). Plain side: a hand-written epoch over the same
uint8 tensors (per-batch slicing, the same on-device crop/flip/normalise, the same KD step, then
an evaluation pass), run from ``on_train_epoch_end``, so the two alternate epoch by epoch.
``--precision bf16-mixed``, ``--channels-last`` and ``--compile [MODE]`` (``torch.compile``'s mode,
``default`` when none is named; ``reduce-overhead`` replays CUDA graphs) apply to both sides. The first
epoch (compilation, warm-up) is left out of the medians when there are more.

    python benchmarks/gpu_epoch.py --device cuda [--precision bf16-mixed] [--channels-last] [--compile [MODE]]
"""

from __future__ import annotations

import copy
import sys
import tempfile
import warnings
from pathlib import Path
from typing import get_args

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import clock, median, parser, print_table, write_fake_cifar100, write_json  # noqa: E402
from overhead import plain_kd_step  # noqa: E402

from distill.data import CIFAR100DataModule  # noqa: E402
from distill.data.augment import random_crop_flip, step_generator  # noqa: E402
from distill.data.cifar import CIFAR100_MEAN, CIFAR100_STD  # noqa: E402
from distill.data.tensor import normalize  # noqa: E402
from distill.losses import KDTerm  # noqa: E402
from distill.methods import OfflineKD  # noqa: E402
from distill.methods.base import CompileMode  # noqa: E402

PROTOCOL_EPOCHS = 240


class PlainEpoch:
    """One hand-written training epoch plus an evaluation pass, on copies of the module's networks."""

    def __init__(self, module: OfflineKD, dm: CIFAR100DataModule, args):
        self.device = torch.device(args.device)
        self.dm, self.batch_size, self.bf16 = dm, args.batch_size, args.precision == "bf16-mixed"
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        self.student = copy.deepcopy(module.student).to(self.device, memory_format=self.memory_format)
        teacher = copy.deepcopy(module.teacher).to(self.device, memory_format=self.memory_format)
        if args.compile:
            self.student.compile(mode=args.compile)
            teacher.compile(mode=args.compile)
        self.step = plain_kd_step(self.student, teacher, self.bf16)
        self.global_step = 0

    def images(self, uint8: torch.Tensor, train: bool) -> torch.Tensor:
        images = uint8.to(self.device, non_blocking=True)
        if train:
            images = random_crop_flip(images, 4, True, step_generator(0, self.global_step, self.device))
        return normalize(images, CIFAR100_MEAN, CIFAR100_STD).contiguous(memory_format=self.memory_format)

    def __call__(self, epoch: int) -> None:
        train, test = self.dm.train_set, self.dm.test_set
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(epoch))
        self.student.train()
        for start in range(0, len(train), self.batch_size):
            index = order[start : start + self.batch_size]
            self.step(self.images(train.images[index], True), train.targets[index].to(self.device, non_blocking=True))
            self.global_step += 1
        self.student.eval()
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            for start in range(0, len(test), self.batch_size):
                self.student(self.images(test.images[start : start + self.batch_size], False)).argmax(1).cpu()


class AlternateEpochs(pl.Callback):
    """Times each Lightning epoch (training + validation), then runs and times one plain epoch."""

    def __init__(self, plain: PlainEpoch, device: str):
        self.plain, self.device = plain, device
        self.seconds: dict[str, list[float]] = {"distill": [], "plain": []}

    def on_train_epoch_start(self, trainer, pl_module):
        self.start = clock(self.device)

    def on_train_epoch_end(self, trainer, pl_module):
        middle = clock(self.device)
        self.seconds["distill"].append(middle - self.start)
        self.plain(trainer.current_epoch)
        self.seconds["plain"].append(clock(self.device) - middle)


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--images", type=int, default=50_000)
    p.add_argument("--test-images", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", choices=["32-true", "bf16-mixed"], default="32-true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", nargs="?", const="default", choices=get_args(CompileMode), help="torch.compile mode")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.images, args.test_images, args.batch_size = 2, 32, 16, 16
    warnings.filterwarnings("ignore", message=".*(does not have many workers|smaller than the logging interval).*")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        dm = CIFAR100DataModule(
            str(write_fake_cifar100(Path(tmp), args.images, args.test_images)),
            batch_size=args.batch_size,
            pipeline="device",
            verify_md5=False,
        )
        dm.setup("fit")
        module = OfflineKD(
            student="resnet8x4",
            teacher="resnet32x4",
            terms=[KDTerm()],
            ce_weight=0.1,
            channels_last=args.channels_last,
            compile=args.compile or False,
        )
        alternate = AlternateEpochs(PlainEpoch(module, dm, args), args.device)
        trainer = pl.Trainer(
            accelerator="gpu" if args.device == "cuda" else "cpu",
            devices=1,
            max_epochs=args.epochs,
            precision=args.precision,
            logger=CSVLogger(Path(tmp) / "logs"),
            callbacks=[alternate],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        trainer.fit(module, datamodule=dm)
    steady = {k: v[1:] if len(v) > 1 else v for k, v in alternate.seconds.items()}
    rows = [
        {
            "side": side,
            "epoch_s": median(s),
            "images_per_s": args.images / median(s),
            "projected_240_epochs_h": PROTOCOL_EPOCHS * median(s) / 3600,
            "epochs_s": alternate.seconds[side],
        }
        for side, s in steady.items()
    ]
    ratio = rows[0]["epoch_s"] / rows[1]["epoch_s"]
    flags = ["channels_last"] if args.channels_last else []
    if args.compile:
        flags.append("compile" if args.compile == "default" else f"compile_{args.compile}")
    options = ", ".join([args.precision, *flags])
    print_table(
        f"KD resnet32x4 -> resnet8x4, {args.images} images/epoch, batch {args.batch_size}, {args.device}, {options}",
        ["side", "s / epoch", "images/s", "240 epochs (h)"],
        [[r["side"], r["epoch_s"], round(r["images_per_s"]), r["projected_240_epochs_h"]] for r in rows],
    )
    print(f"ratio distill / plain: {ratio:.3f}")
    write_json("-".join(["gpu_epoch", args.device, args.precision, *flags]), args, {"results": rows, "ratio": ratio})
    return {"results": rows, "ratio": ratio}


if __name__ == "__main__":
    main()
