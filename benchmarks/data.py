"""Input pipeline throughput: one CIFAR-100 training epoch of augmentation (crop 32 pad 4, flip, normalise).

Three ways to produce normalised, augmented float batches on the device, from fake CIFAR-100 files
of the real size (50,000 training images; ``--images`` to change):

- ``torchvision (plain)``, the baseline: ``torchvision.datasets.CIFAR100`` with PIL transforms in
  ``num_workers`` DataLoader workers, as the usual CIFAR training scripts do;
- ``distill torchvision``: ``CIFAR100DataModule(pipeline="torchvision")``, v2 transforms on uint8
  tensors in the same number of persistent workers;
- ``distill device``: ``CIFAR100DataModule(pipeline="device")``, one indexing op per batch in the
  main process, then crop/flip/normalise of the whole batch on the device.

Epochs alternate between the pipelines (A, B, C, A, B, C, ...); each loader is built once, as in a
training run. Reported: median seconds per epoch, images/s, speed-up over the baseline.

    python benchmarks/data.py [--device cuda] [--repeats 5] [--quick]
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import CIFAR100

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    datamodule_pass,
    loader_pass,
    parser,
    print_table,
    time_pipelines,
    write_fake_cifar100,
    write_json,
)

from distill.data import CIFAR100DataModule  # noqa: E402
from distill.data.cifar import CIFAR100_MEAN, CIFAR100_STD  # noqa: E402


class UncheckedCIFAR100(CIFAR100):
    """torchvision's CIFAR100 without the MD5 checks (the files are fake)."""

    def _check_integrity(self) -> bool:
        return True

    def _load_meta(self) -> None:
        self.classes = [f"class_{i}" for i in range(100)]
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}


def plain_epoch(root: Path, args):
    dataset = UncheckedCIFAR100(
        str(root),
        train=True,
        transform=transforms.Compose(
            [
                transforms.RandomCrop(32, padding=4),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(CIFAR100_MEAN, CIFAR100_STD),
            ]
        ),
    )
    loader = DataLoader(
        dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers, pin_memory=args.device == "cuda"
    )
    return loader_pass(loader, args.device)


def distill_epoch(root: Path, args, pipeline: str):
    dm = CIFAR100DataModule(
        str(root), batch_size=args.batch_size, num_workers=args.workers, pipeline=pipeline, verify_md5=False
    )
    return datamodule_pass(dm, args.device)


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=50_000)
    p.add_argument("--repeats", type=int, default=3, help="epochs per pipeline")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader workers (CPU pipelines)"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.repeats = 512, 1
    with tempfile.TemporaryDirectory() as tmp:
        root = write_fake_cifar100(Path(tmp), args.images, 100)
        pipelines = {
            "torchvision (plain)": plain_epoch(root, args),
            "distill torchvision": distill_epoch(root, args, "torchvision"),
            "distill device": distill_epoch(root, args, "device"),
        }
        rows = time_pipelines(pipelines, args.images, args.repeats, args.device)
    print_table(
        f"One CIFAR-100 epoch of augmentation ({args.images} images, batch {args.batch_size}, {args.device}, "
        f"{args.workers} workers, median of {args.repeats})",
        ["pipeline", "s / epoch", "images/s", "speed-up"],
        [[r["pipeline"], r["median_s"], round(r["images_per_s"]), r["speedup"]] for r in rows],
    )
    write_json("data", args, {"images": args.images, "results": rows})
    return {"results": rows}


if __name__ == "__main__":
    main()
