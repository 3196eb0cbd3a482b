"""ImageNet input throughput: one pass of training augmentation (RandomResizedCrop 224, flip, normalise) over JPEGs.

Fake ImageNet-like JPEGs (about 500×375, ~100 kB each; ``--images``) in an ImageFolder tree, served
as normalised float batches on the device by

- ``torchvision (plain)``, the baseline: ``torchvision.datasets.ImageFolder`` with the classic PIL
  transforms in ``--workers`` DataLoader workers, as the ImageNet reference scripts do;
- ``distill pil``: ``ImageNetDataModule(decode="pil")``, the same work (v2 transforms);
- ``distill tensor``: ``decode="tensor"``, libjpeg-turbo to uint8 tensors and uint8 transforms in the
  workers, normalisation on the device;
- ``distill device``: ``decode="device"``, workers only read the files; decoding (nvJPEG on CUDA,
  the main process's libjpeg-turbo on the CPU), crops, flips and normalisation on the device.

Passes alternate between the pipelines; each loader is built once, as in a training run. Reported:
median seconds per pass, images/s and the speed-up over the baseline.

    python benchmarks/imagenet_data.py [--device cuda] [--images 2000] [--workers 8] [--quick]
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import ImageFolder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    datamodule_pass,
    loader_pass,
    parser,
    print_table,
    time_pipelines,
    write_fake_jpeg_folder,
    write_json,
)

from distill.data import ImageNetDataModule  # noqa: E402
from distill.data.imagenet import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402


def plain_pass(root: Path, args):
    dataset = ImageFolder(
        str(root / "train"),
        transform=transforms.Compose(
            [
                transforms.RandomResizedCrop(224),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        ),
    )
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        pin_memory=args.device == "cuda",
        persistent_workers=args.workers > 0,
    )
    return loader_pass(loader, args.device)


def distill_pass(root: Path, args, decode: str):
    dm = ImageNetDataModule(
        str(root), batch_size=args.batch_size, num_workers=args.workers, num_classes=10, decode=decode
    )
    return datamodule_pass(dm, args.device)


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3, help="passes per pipeline")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="DataLoader workers")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.repeats, args.batch_size, args.workers = 24, 1, 8, 0
    with tempfile.TemporaryDirectory() as tmp:
        root, kilobytes = write_fake_jpeg_folder(Path(tmp), args.images)
        pipelines = {"torchvision (plain)": plain_pass(root, args)}
        pipelines.update(
            {f"distill {decode}": distill_pass(root, args, decode) for decode in ("pil", "tensor", "device")}
        )
        rows = time_pipelines(pipelines, args.images, args.repeats, args.device)
    print_table(
        f"ImageNet training augmentation over {args.images} JPEGs (mean {kilobytes:.0f} kB; batch {args.batch_size}, "
        f"{args.device}, {args.workers} workers, median of {args.repeats})",
        ["pipeline", "s / pass", "images/s", "speed-up"],
        [[r["pipeline"], r["median_s"], round(r["images_per_s"]), r["speedup"]] for r in rows],
    )
    write_json("imagenet_data", args, {"images": args.images, "mean_file_kb": kilobytes, "results": rows})
    return {"results": rows}


if __name__ == "__main__":
    main()
