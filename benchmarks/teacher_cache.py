"""Teacher cache: a KD training step reading stored teacher logits vs the same step running the live teacher.

Both sides are real ``Trainer.fit`` runs of an :class:`~distill.methods.OfflineKD` (CE 0.1 + KD 0.9,
τ = 4) on fake CIFAR-100 (random pixels) served by the device pipeline (batches sliced from memory,
cropped and flipped per step), with the same student and teacher; the cached side reads the logits
that a ``distill cache-teacher`` pass (:func:`distill.tools.cache_teacher.write_teacher_cache`) wrote
for exactly those batches. Every round runs the cache pass, a live fit and a cached fit of one epoch
of ``--steps`` batches, so all three see the same machine load; a step is timed from one
``on_train_batch_end`` to the next (fetch, augmentation, forward, backward, optimiser, logging), the
first ``--warmup`` steps of each fit left out. Reported: median step times, their interquartile
range, the speed-up (live / cached) per round, the cache pass's time relative to one live epoch over
the same batches, and the store's size per epoch (measured, and for the real CIFAR-100 train split).

    python benchmarks/teacher_cache.py [--device cuda] [--steps 20] [--rounds 3] [--teacher-batch N] [--quick]
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import clock, median, parser, print_table, write_fake_cifar100, write_json  # noqa: E402

from distill.data import CIFAR100DataModule  # noqa: E402
from distill.data.teacher_cache import STORE_DTYPES  # noqa: E402
from distill.losses import KDTerm  # noqa: E402
from distill.methods import OfflineKD  # noqa: E402
from distill.models import create_model  # noqa: E402
from distill.tools.cache_teacher import write_teacher_cache  # noqa: E402

PAIRS = [("resnet32x4", "resnet8x4"), ("resnet56", "resnet20")]
CIFAR100_TRAIN = 50_000


class StepClock(pl.Callback):
    """Seconds between consecutive training batch ends after ``warmup`` steps, and the epoch's seconds."""

    def __init__(self, device: str, warmup: int):
        self.device, self.warmup = device, warmup
        self.steps: list[float] = []
        self.epoch_s = float("nan")
        self._mark = self._epoch_start = None

    def on_train_epoch_start(self, trainer, pl_module):
        self._epoch_start = clock(self.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = clock(self.device)
        if batch_idx >= self.warmup and self._mark is not None:
            self.steps.append(now - self._mark)
        self._mark = now

    def on_train_epoch_end(self, trainer, pl_module):
        self.epoch_s = clock(self.device) - self._epoch_start


def make_trainer(args, callbacks=()) -> pl.Trainer:
    """The trainer of both sides and of the cache pass (the store's fingerprint must match the fits')."""
    return pl.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        max_epochs=1,
        limit_val_batches=0,
        logger=False,
        callbacks=list(callbacks),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def quartiles(values: list[float]) -> list[float]:
    if len(values) < 2:
        return [median(values)] * 2
    q = statistics.quantiles(values, n=4)
    return [q[0], q[2]]


def measure(teacher: str, student: str, args, workdir: Path) -> dict:
    data = write_fake_cifar100(workdir / "cifar", args.steps * args.batch_size, args.batch_size)
    datamodule = CIFAR100DataModule(
        data_dir=str(data), batch_size=args.batch_size, num_workers=0, pipeline="device", verify_md5=False
    )
    torch.manual_seed(0)
    weights = workdir / f"{teacher}.pt"
    torch.save(create_model(teacher).state_dict(), weights)

    def module(**cache) -> OfflineKD:
        torch.manual_seed(0)
        kd = dict(student=student, teacher=teacher, teacher_weights=str(weights), terms=[KDTerm()], ce_weight=0.1)
        return OfflineKD(**kd, num_classes=100, image_size=32, **cache)

    store = workdir / "store"
    live, cached = module(), module(teacher_cache=str(store))
    steps = {"live": [], "cached": []}
    epochs = {"live": [], "cached": []}
    passes, speedups = [], []
    for _ in range(args.rounds):
        shutil.rmtree(store, ignore_errors=True)
        writer, trainer = module(), make_trainer(args)
        start = clock(args.device)
        write_teacher_cache(trainer, writer, datamodule, store, args.dtype, args.teacher_batch, progress=False)
        passes.append(clock(args.device) - start)
        this_round = {}
        for side, kd in (("live", live), ("cached", cached)):
            timer = StepClock(args.device, args.warmup)
            make_trainer(args, [timer]).fit(kd, datamodule=datamodule)
            this_round[side] = timer.steps
            steps[side] += timer.steps
            epochs[side].append(timer.epoch_s)
        speedups.append(median(this_round["live"]) / median(this_round["cached"]))
    store_bytes = sum(f.stat().st_size for f in store.iterdir() if f.suffix == ".bin")
    row_bytes = 100 * STORE_DTYPES[args.dtype].itemsize + 4  # logits + int32 sample index
    return {
        "pair": f"{teacher}->{student}",
        "batch_size": args.batch_size,
        "steps": len(steps["live"]),
        "live_median_s": median(steps["live"]),
        "cached_median_s": median(steps["cached"]),
        "speedup": median(steps["live"]) / median(steps["cached"]),
        "live_iqr_s": quartiles(steps["live"]),
        "cached_iqr_s": quartiles(steps["cached"]),
        "round_speedups": speedups,
        "cache_pass_s": median(passes),
        "cache_pass_runs_s": passes,
        "live_epoch_s": median(epochs["live"]),
        "cached_epoch_s": median(epochs["cached"]),
        "cache_pass_vs_epoch": median(passes) / median(epochs["live"]),
        "store_bytes_per_epoch": store_bytes,
        "cifar100_store_mb_per_epoch": CIFAR100_TRAIN * row_bytes / 1e6,
    }


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="batches of the one-epoch fits (and of the store)")
    p.add_argument("--warmup", type=int, default=2, help="steps of each fit left out")
    p.add_argument("--rounds", type=int, default=3, help="rounds of (cache pass, live fit, cached fit)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dtype", choices=list(STORE_DTYPES), default="fp32")
    p.add_argument("--teacher-batch", type=int, default=None, help="rows per teacher call in the cache pass")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.rounds, args.batch_size = 3, 1, 1, 8
    noise = "does not have many workers|smaller than the logging interval|no `val_dataloader`|exists and is not empty"
    warnings.filterwarnings("ignore", message=f".*({noise}).*")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(teacher, student, args, Path(tmp) / teacher) for teacher, student in PAIRS]
    print_table(
        f"KD step with the teacher cache vs the live teacher ({args.device}, batch {args.batch_size}, "
        f"{args.rounds} rounds of {args.steps} steps, {args.dtype} store)",
        [
            "teacher -> student",
            "live ms",
            "cached ms",
            "speed-up",
            "speed-up per round",
            "pass / live epoch",
            "MB/epoch",
        ],
        [
            [
                r["pair"],
                1e3 * r["live_median_s"],
                1e3 * r["cached_median_s"],
                r["speedup"],
                " ".join(f"{s:.2f}" for s in r["round_speedups"]),
                r["cache_pass_vs_epoch"],
                r["cifar100_store_mb_per_epoch"],
            ]
            for r in rows
        ],
    )
    print("(MB/epoch: the store for the 50,000 CIFAR-100 training images; ms: medians over the rounds' steps)")
    write_json("teacher_cache", args, {"results": rows, "seconds": time.perf_counter() - started})
    return {"results": rows}


if __name__ == "__main__":
    main()
