"""``distill cache-teacher``: run a frozen teacher once over a schedule's training batches, store its logits.

    distill cache-teacher --config PAIR.yaml [--config METHOD.yaml ...] [--seed N] --out DIR
                          [--dtype fp32|fp16|bf16] [--teacher-batch N] [other `distill fit` config arguments]
    distill fit --config PAIR.yaml --config METHOD.yaml --model.init_args.teacher_cache DIR

The configs are those of the student runs the store serves (any of them: neither the student nor a
logit term changes the teacher's batches). The pass replays, for every epoch of the schedule and
every DDP rank's share, the batches such a run draws: the DataModule's own sampler and augmentation
hooks, with the step counter, epoch and rank a fit has at each batch, and the stage plan
entered at every epoch as in a fit (:func:`stage_callbacks`). The teacher runs in inference mode on
the run's device, under its precision and memory format. The store and its fingerprint are
described in :mod:`distill.data.teacher_cache`; rerunning an interrupted pass continues it, and
rerunning a finished one does nothing.

``--seed N`` sets the data seed (``data.init_args.seed``, which orders the epochs and draws the
crops); ``seed_everything`` (the student's initialisation) does not change the teacher's batches.

Exactness [chosen]: by default the teacher runs on exactly the live teacher's batches (same inputs,
same shapes, same device, precision and memory format), so it returns the same bits wherever its
kernels are deterministic for a given input shape, and a student trained from an fp32 store ends
bit-identical to one trained with the live teacher (tests/test_teacher_cache.py, CPU).
``--teacher-batch N`` (a multiple of the training batch) runs N rows at a time, for a GPU's sake;
a kernel may round differently at another batch size (on the CPU the tests run on, MobileNetV2 and
ShuffleNet teachers do, at batch sizes not a multiple of 16), so the pass compares its first group
with the training batch size's result and records the outcome in ``meta.json``
(``teacher_batch_check``).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytorch_lightning as pl
import torch
from tqdm import tqdm

from ..callbacks.stages import StagePlan
from ..data.teacher_cache import (
    FORMAT,
    STORE_DTYPES,
    CacheLayout,
    TeacherCache,
    TeacherCacheWriter,
    as_json,
    describe_run,
    replay_refusal,
)
from ..methods.kd import OfflineKD, teacher_cache_refusals


def refusal(module: pl.LightningModule, datamodule) -> str | None:
    """Why a teacher cache cannot serve this method on this data (``None``: it can)."""
    if not isinstance(module, OfflineKD):
        return (
            f"{type(module).__name__} is not an offline KD method: the teacher cache serves OfflineKD and the "
            "methods built on it whose training steps read only the teacher's logits (KD, DKD, KR, PWKD, ...)"
        )
    reasons = teacher_cache_refusals(type(module), zip(module.term_names, module.terms))
    if reasons:
        return f"stored logits cannot stand in for the teacher: {'; '.join(reasons)}"
    return replay_refusal(datamodule)


def stage_callbacks(trainer: pl.Trainer) -> list[pl.Callback]:
    """The callbacks that choose, at every epoch start, which teacher the training steps run: the stage
    plan (PWKD's widths). The one place the cache pass knows about them; it calls their ``setup`` and
    ``enter`` as a fit would, and reads the result from ``module.teacher_setting()``."""
    return [callback for callback in trainer.callbacks if isinstance(callback, StagePlan)]


class ReplayTrainer:
    """What a DataModule's training hooks and a stage callback read from a Trainer, set by the pass as
    a fit of ``trainer`` would have it at each batch of one rank's share."""

    training = True

    def __init__(self, trainer: pl.Trainer):
        self.world_size, self.max_epochs = trainer.world_size, trainer.max_epochs
        self.global_rank = self.global_step = self.current_epoch = 0


class CachePass:
    """One teacher pass over a run's schedule; :meth:`run` writes the store."""

    def __init__(self, trainer: pl.Trainer, module: OfflineKD, datamodule, teacher_batch: int | None):
        reason = refusal(module, datamodule)
        if reason:
            raise ValueError(f"distill cache-teacher: {reason}")
        self.trainer, self.module, self.datamodule = trainer, module, datamodule
        datamodule.prepare_data()
        datamodule.setup("fit")
        self.stages, self.replay = stage_callbacks(trainer), ReplayTrainer(trainer)
        for callback in self.stages:
            callback.setup(self.replay, module, "fit")
        self.fingerprint, self.layout = describe_run(trainer, datamodule, module)
        batch = self.layout.batch_size
        self.teacher_batch = teacher_batch or batch
        if self.teacher_batch < batch or self.teacher_batch % batch:
            raise ValueError(f"--teacher-batch {teacher_batch}: expected a multiple of the training batch size {batch}")
        self.settings = [self.enter_epoch(epoch) for epoch in range(self.layout.epochs)]
        self.device = trainer.strategy.root_device
        self.batch_check: str | None = None  # the first group's comparison with the training batch size

    def enter_epoch(self, epoch: int):
        """Start ``epoch`` as a fit does (stage callbacks); return the teacher setting it runs with."""
        self.replay.current_epoch = epoch
        for callback in self.stages:
            callback.enter(self.replay, self.module)
        return self.module.teacher_setting()

    def meta(self, dtype: str) -> dict:
        return {
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "layout": asdict(self.layout),
            "dtype": dtype,
            "teacher_settings": as_json(self.settings),
            "teacher_batch": self.teacher_batch,
        }

    def batches(self, epoch: int, rank: int, first: int):
        """``(images, index)`` of rank ``rank``'s batches of ``epoch`` from batch ``first`` on, on the
        device and augmented, as the fit's transfer hooks hand them to its training step."""
        replay, datamodule, plugin = self.replay, self.datamodule, self.trainer.precision_plugin
        replay.global_rank = rank
        datamodule.trainer = replay
        loader = datamodule.train_dataloader()
        loader.load_state_dict({"epoch": epoch, "batches": first})
        for number, batch in enumerate(loader, start=first):
            if number >= self.layout.batches_per_epoch:
                break
            replay.global_step = self.layout.global_step(epoch, number)
            batch = datamodule.on_before_batch_transfer(plugin.convert_input(batch), 0)
            batch = datamodule.on_after_batch_transfer(datamodule.transfer_batch_to_device(batch, self.device, 0), 0)
            yield batch[0], batch[2]

    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The live training step's teacher call (``teacher_forward``), in inference mode."""
        with torch.inference_mode(), self.trainer.precision_plugin.train_step_context():
            return self.module.teacher_forward(self.module.format_input(images)).logits

    def grouped_logits(self, group: list[torch.Tensor]) -> torch.Tensor:
        """The teacher's logits for consecutive batches run as one; the first group is checked against
        the batches run one by one (the live shapes)."""
        if len(group) == 1:
            return self.teacher_logits(group[0])
        logits = self.teacher_logits(torch.cat(group))
        if self.batch_check is None:
            single = torch.cat([self.teacher_logits(images) for images in group])
            difference = (logits.float() - single.float()).abs().max().item()
            self.batch_check = (
                f"first group of {len(logits)} rows bit-identical to batches of {self.layout.batch_size}"
                if torch.equal(logits, single)
                else f"differs from batches of {self.layout.batch_size} by up to {difference:.3g}: not bit-exact"
            )
            print(f"teacher batch {self.teacher_batch}: {self.batch_check}", file=sys.stderr)
        return logits

    def write_share(self, writer: TeacherCacheWriter, epoch: int, rank: int, first: int, bar: tqdm) -> None:
        """Rank ``rank``'s share of ``epoch`` from batch ``first`` on, ``teacher_batch`` rows per teacher call."""
        self.enter_epoch(epoch)
        self.module.teacher.eval()
        per_call, last = self.teacher_batch // self.layout.batch_size, self.layout.batches_per_epoch - 1
        images, index = [], []
        for number, (batch_images, batch_index) in enumerate(self.batches(epoch, rank, first), start=first):
            images.append(batch_images)
            index.append(batch_index)
            if len(images) == per_call or number == last:
                writer.append(self.grouped_logits(images), torch.cat(index))
                bar.update(sum(len(i) for i in index))
                images, index = [], []
        writer.commit()

    def run(self, out: Path, dtype: str = "fp32", progress: bool = True) -> Path:
        out = Path(out)
        if out.exists():
            TeacherCache(out).check(self.fingerprint)
            print(f"{out} is already a complete store for this run", file=sys.stderr)
            return out
        started = time.perf_counter()
        module = self.trainer.precision_plugin.convert_module(self.module.to(self.device))
        module.configure_model()  # channels-last / compile, as in the fit
        logits_dtype = self.teacher_logits(next(self.batches(0, 0, 0))[0]).dtype  # what the stored rows widen back to
        writer = TeacherCacheWriter(out, {**self.meta(dtype), "logits_dtype": str(logits_dtype).removeprefix("torch.")})
        layout = self.layout
        first_share, offset = divmod(writer.rows, layout.block_rows)
        bar = tqdm(total=layout.rows, initial=writer.rows, unit="img", desc="teacher cache", disable=not progress)
        try:
            for share in range(first_share, layout.epochs * layout.world_size):
                first = offset // layout.batch_size if share == first_share else 0
                self.write_share(writer, *divmod(share, layout.world_size), first, bar)
        except BaseException:
            writer.close()  # what was committed stays for the next pass
            raise
        finally:
            bar.close()
        return writer.finish(
            {
                "teacher_batch_check": self.batch_check or "not needed: the training batch size",
                "written_with": {
                    "torch": torch.__version__,
                    "device": describe_device(self.device),
                    "seconds": round(time.perf_counter() - started, 3),
                },
            }
        )


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def write_teacher_cache(
    trainer: pl.Trainer,
    module: OfflineKD,
    datamodule,
    out: str | Path,
    dtype: str = "fp32",
    teacher_batch: int | None = None,
    progress: bool = True,
) -> Path:
    """Write (or finish) the store of ``module``'s teacher for a fit of ``module`` by ``trainer`` on
    ``datamodule``; the objects are those ``distill fit`` would build from the same configs."""
    if dtype not in STORE_DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {', '.join(STORE_DTYPES)}")
    return CachePass(trainer, module, datamodule, teacher_batch).run(Path(out), dtype, progress)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="distill cache-teacher",
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,
        epilog="Other arguments are those of `distill fit` (--config FILE, --trainer.*, --data.*, --model.*).",
    )
    parser.add_argument("--out", type=Path, required=True, help="the store's directory")
    parser.add_argument("--seed", type=int, help="the data seed (data.init_args.seed): shuffles and crops")
    parser.add_argument("--dtype", choices=list(STORE_DTYPES), default="fp32", help="storage dtype (default fp32)")
    parser.add_argument(
        "--teacher-batch",
        type=int,
        help="rows per teacher call, a multiple of the training batch (default: the training batch, bit-exact)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args, config_args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if not any(arg == "--config" or arg.startswith("--config=") for arg in config_args):
        parser.error("give the configs of the student runs the store serves: --config PAIR.yaml [--config ...]")
    if args.seed is not None:
        config_args.append(f"--data.init_args.seed={args.seed}")
    from ..cli import build_cli

    cli = build_cli(config_args, run=False)
    path = write_teacher_cache(
        cli.trainer, cli.model, cli.datamodule, args.out, args.dtype, args.teacher_batch, not args.no_progress
    )
    layout = CacheLayout(**TeacherCache(path).meta["layout"])
    size = sum(f.stat().st_size for f in path.iterdir())
    print(
        f"{path}: {layout.rows} rows ({layout.epochs} epochs x {layout.world_size} ranks x {layout.block_rows}), "
        f"{size / 1e6:.1f} MB; train with --model.init_args.teacher_cache {path}",
        file=sys.stderr,
    )
    return path


if __name__ == "__main__":
    main()
