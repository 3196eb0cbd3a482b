"""The teacher cache: a frozen teacher's logits for every training batch of a schedule, stored once.

With a device pipeline the training batches are a pure function of the run's settings: the epoch's
permutation of ``(seed, epoch)`` dealt out to the ranks (:mod:`distill.data.distributed`), crops and
flips drawn from ``(seed, global step, rank)`` (:mod:`distill.data.augment`). So are a frozen
teacher's outputs on them, and one pass of the teacher (``distill cache-teacher``,
:mod:`distill.tools.cache_teacher`) can serve every student run of a sweep that shares them.

A store is a directory:

- ``meta.json``: the fingerprint (everything the batch sequence and the teacher's outputs depend on,
  :func:`describe_run`), the layout (:class:`CacheLayout`), the storage dtype, the teacher setting
  of every epoch (PWKD's stage and width) and how it was written;
- ``logits.bin``: one row of ``num_classes`` logits per training sample drawn, in the order
  epoch, rank, batch (fp32, fp16 or bf16, little-endian, C order);
- ``index.bin``: the dataset index of every row (int32), checked against every batch read.

It is written under ``<dir>.partial/`` and renamed to ``<dir>`` once complete, so a directory with
the final name is always a whole store; an interrupted pass resumes from its last commit
(``progress.json``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..models.staged import StagedOutput
from .digits import DigitsDataModule
from .tensor import UInt8ImageDataModule

FORMAT = 1
STORE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# numpy has no bfloat16: rows are mapped as same-sized integers and viewed as the store dtype
_NUMPY_VIEW = {"fp32": np.float32, "fp16": np.float16, "bf16": np.uint16}
# DataModule attributes that shape the training batches, recorded where the DataModule has them
DATA_SETTINGS = ("pipeline", "image_size", "pad", "flip", "mean", "std", "train_fraction", "test_fraction")
COMMIT_EVERY_S = 30.0  # an interrupted pass loses at most about this much work


@dataclass(frozen=True)
class CacheLayout:
    """Where each training batch's rows lie in a store, and the global step it is drawn at.

    A rank's share of an epoch is ``rank_samples`` samples (the permutation padded to a multiple of
    the world size, as ``DistributedSampler`` deals it), served in batches of ``batch_size`` (the
    last one smaller), of which the first ``batches_per_epoch`` are trained on
    (``trainer.limit_train_batches``). Lightning steps the optimiser every
    ``accumulate_grad_batches`` batches and at the end of an epoch.
    """

    epochs: int
    world_size: int
    rank_samples: int
    batch_size: int
    batches_per_epoch: int
    accumulate_grad_batches: int
    num_classes: int

    @property
    def block_rows(self) -> int:
        """Rows of one (epoch, rank) block: the samples that rank trains on in that epoch."""
        return min(self.rank_samples, self.batches_per_epoch * self.batch_size)

    @property
    def rows(self) -> int:
        return self.epochs * self.world_size * self.block_rows

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.batches_per_epoch / self.accumulate_grad_batches)

    def global_step(self, epoch: int, batch: int) -> int:
        """``trainer.global_step`` while batch ``batch`` of ``epoch`` is drawn (it seeds the crops)."""
        return epoch * self.steps_per_epoch + batch // self.accumulate_grad_batches

    def batch_rows(self, epoch: int, rank: int, batch: int) -> tuple[int, int]:
        """``(start, stop)`` rows of that batch."""
        block = (epoch * self.world_size + rank) * self.block_rows
        start = block + batch * self.batch_size
        return start, min(start + self.batch_size, block + self.block_rows)


def limited_batches(length: int, limit: int | float) -> int:
    """Batches an epoch trains on: Lightning's ``limit_train_batches`` rule (an int caps, a float scales)."""
    return min(length, limit) if isinstance(limit, int) else int(length * limit)


def replay_refusal(datamodule) -> str | None:
    """Why the teacher cache cannot replay this DataModule's training batches (``None``: it can).

    Only the device pipelines draw their augmentation from the step; the worker pipelines draw it
    from each worker's random state.
    """
    if datamodule is None:
        return "the run has no DataModule (the teacher cache replays a distill DataModule's training batches)"
    name = type(datamodule).__name__
    if isinstance(datamodule, DigitsDataModule):
        return None
    if isinstance(datamodule, UInt8ImageDataModule):
        if datamodule.pipeline == "device":
            return None
        return (
            f"{name} with pipeline={datamodule.pipeline!r} crops and flips in DataLoader workers, not as a "
            "function of the step, so no two runs see the same batches; set data.init_args.pipeline: device"
        )
    return (
        f"{name}: its training augmentation runs in DataLoader workers and is not a pure function of the "
        "step; the teacher cache serves the device pipelines (CIFAR-100 and Fashion-MNIST with "
        "pipeline: device, the digits)"
    )


def data_sha256(dataset) -> str:
    """SHA-256 of a split's images and targets as held in memory (the device pipelines hold them whole)."""
    digest = hashlib.sha256()
    for tensor in (dataset.images, torch.as_tensor(dataset.targets)):
        digest.update(memoryview(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def run_epochs(trainer, steps_per_epoch: int) -> int:
    """Epochs a fit of ``trainer`` trains (``max_epochs``, or fewer when ``max_steps`` ends it first)."""
    epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else None
    if trainer.max_steps not in (None, -1):
        by_steps = math.ceil(trainer.max_steps / steps_per_epoch)
        epochs = by_steps if epochs is None else min(epochs, by_steps)
    if epochs is None:
        raise ValueError("the teacher cache needs a finite schedule: set trainer.max_epochs or trainer.max_steps")
    return epochs


def describe_run(trainer, datamodule, module) -> tuple[dict, CacheLayout]:
    """The fingerprint and the layout of the training batches a fit of ``module`` by ``trainer`` on
    ``datamodule`` draws: the same on the student run and in the cache pass, or the store is refused.

    The DataModule must have been set up for ``fit``; ``module`` is an offline KD method
    (``teacher_info``, ``channels_last``, ``compile_networks``).
    """
    refusal = replay_refusal(datamodule)
    if refusal:
        raise ValueError(f"teacher cache: {refusal}")
    if trainer.overfit_batches:
        raise ValueError("the teacher cache does not replay trainer.overfit_batches (Lightning swaps the sampler)")
    info = module.teacher_info
    weights = info.get("weights")
    if not weights or (isinstance(weights, list) and not all(weights)):
        raise ValueError("the teacher cache needs the teacher's weights (model.init_args.teacher_weights)")
    dataset = datamodule.train_set
    world, batch_size = trainer.world_size, datamodule.batch_size
    rank_samples = math.ceil(len(dataset) / world)
    batches = limited_batches(math.ceil(rank_samples / batch_size), trainer.limit_train_batches)
    accumulate = trainer.accumulate_grad_batches
    epochs = run_epochs(trainer, math.ceil(batches / accumulate))
    layout = CacheLayout(epochs, world, rank_samples, batch_size, batches, accumulate, module.num_classes)
    fingerprint = {
        "teacher": info["arch"],
        "teacher_sha256": info["sha256"],
        "teacher_kwargs": module.hparams.get("teacher_kwargs") or {},
        "dataset": f"{type(datamodule).__module__}.{type(datamodule).__qualname__}",
        "split": "train",
        "train_samples": len(dataset),
        "train_data_sha256": data_sha256(dataset),
        **{name: getattr(datamodule, name) for name in DATA_SETTINGS if hasattr(datamodule, name)},
        "seed": datamodule.seed,
        "batch_size": batch_size,
        "world_size": world,
        "epochs": epochs,
        "batches_per_epoch": batches,
        "accumulate_grad_batches": accumulate,
        "precision": str(trainer.precision),
        "device": trainer.strategy.root_device.type,
        "channels_last": module.channels_last,
        "compile": module.compile_networks,
    }
    return as_json(fingerprint), layout


def as_json(value):
    """``value`` as it reads back from JSON (tuples become lists), so stored and computed values compare."""
    return json.loads(json.dumps(value))


def differing_fields(stored: dict, run: dict) -> list[str]:
    """``"name: store X, this run Y"`` for every field in which two fingerprints differ."""
    return [
        f"{key}: store {stored.get(key, '(absent)')!r}, this run {run.get(key, '(absent)')!r}"
        for key in dict.fromkeys([*stored, *run])
        if stored.get(key) != run.get(key)
    ]


def logits_only(logits: torch.Tensor) -> StagedOutput:
    """A teacher output holding logits only (the terms a cache serves read nothing else)."""
    return StagedOutput(logits, (), None, None)


def partial_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.partial")


def _write_json(path: Path, value: dict) -> None:
    """Write ``path`` through a temporary file and a rename: a reader never sees half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class TeacherCacheWriter:
    """Appends a schedule's logits, in row order, to ``<out>.partial/`` (committed at least every
    ``COMMIT_EVERY_S`` seconds and on :meth:`commit`); :meth:`finish` renames it to ``out``.

    ``meta`` is the store's ``meta.json`` but for how the pass went (added by :meth:`finish`). An
    existing ``<out>.partial`` started with the same ``meta`` is continued after its last commit; one
    started for another run is refused.
    """

    def __init__(self, out: Path, meta: dict):
        self.out, self.partial = Path(out), partial_path(Path(out))
        self.meta, self.layout = meta, CacheLayout(**meta["layout"])
        self.row_bytes = self.layout.num_classes * STORE_DTYPES[meta["dtype"]].itemsize
        self.rows = 0
        if (self.partial / "meta.json").is_file():
            started = json.loads((self.partial / "meta.json").read_text())
            if started != meta:
                fields = differing_fields(started.get("fingerprint", {}), meta["fingerprint"])
                fields += [key for key in meta if key != "fingerprint" and started.get(key) != meta[key]]
                raise ValueError(
                    f"{self.partial} is an interrupted pass for another run ({'; '.join(fields)}): delete it, "
                    "or resume it with that run's configs"
                )
            progress = self.partial / "progress.json"
            self.rows = json.loads(progress.read_text())["rows"] if progress.is_file() else 0
        else:
            self.partial.mkdir(parents=True, exist_ok=True)
            _write_json(self.partial / "meta.json", meta)
        self._logits = self._open("logits.bin", self.rows * self.row_bytes)
        self._index = self._open("index.bin", self.rows * 4)
        self.committed_at = time.monotonic()

    def _open(self, name: str, size: int):
        """The file opened for appending after its first ``size`` bytes (what was committed)."""
        path = self.partial / name
        handle = open(path, "r+b" if path.exists() else "w+b")
        handle.truncate(size)
        handle.seek(size)
        return handle

    def append(self, logits: torch.Tensor, index: torch.Tensor) -> None:
        """The next rows: ``logits`` ``(n, num_classes)`` (cast to the store dtype) and their dataset indices."""
        rows = logits.detach().to("cpu", STORE_DTYPES[self.meta["dtype"]]).contiguous()
        self._logits.write(memoryview(rows.view(-1).view(torch.uint8).numpy()))
        self._index.write(memoryview(index.detach().to("cpu", torch.int32).contiguous().numpy()))
        self.rows += len(rows)
        if time.monotonic() - self.committed_at > COMMIT_EVERY_S:
            self.commit()

    def commit(self) -> None:
        """Make the rows appended so far durable and record them: a resumed pass continues after them."""
        for handle in (self._logits, self._index):
            handle.flush()
            os.fsync(handle.fileno())
        _write_json(self.partial / "progress.json", {"rows": self.rows})
        self.committed_at = time.monotonic()

    def finish(self, extra_meta: dict) -> Path:
        """Check every row was written, complete ``meta.json`` with ``extra_meta``, rename to ``out``."""
        if self.rows != self.layout.rows:
            raise RuntimeError(f"teacher cache pass wrote {self.rows} rows, the layout has {self.layout.rows}")
        self.commit()
        self.close()
        _write_json(self.partial / "meta.json", {**self.meta, **extra_meta})
        (self.partial / "progress.json").unlink()
        os.replace(self.partial, self.out)
        _fsync_dir(self.out.parent)
        return self.out

    def close(self) -> None:
        self._logits.close()
        self._index.close()


class TeacherCache:
    """A complete store, read row by row through memory maps (opened on the first read).

    :meth:`outputs` serves one training step: it finds the step's rows from the trainer's epoch, batch
    index and rank, and checks that the step counter, the batch's sample indices and the teacher
    setting are those the store was written with.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "meta.json").is_file():
            interrupted = partial_path(self.path).exists()
            hint = (
                f"; {partial_path(self.path)} is an interrupted pass: run the same `distill cache-teacher` "
                "again to finish it"
                if interrupted
                else "; write it with `distill cache-teacher --out` and the run's configs"
            )
            raise FileNotFoundError(f"teacher cache {self.path}: no complete store here{hint}")
        self.meta = json.loads((self.path / "meta.json").read_text())
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"teacher cache {self.path}: format {self.meta.get('format')}, expected {FORMAT}")
        self.layout = CacheLayout(**self.meta["layout"])
        self.dtype = self.meta["dtype"]
        for name, itemsize in (
            ("logits.bin", STORE_DTYPES[self.dtype].itemsize * self.layout.num_classes),
            ("index.bin", 4),
        ):
            size, expected = (self.path / name).stat().st_size, self.layout.rows * itemsize
            if size != expected:
                raise ValueError(f"teacher cache {self.path / name}: {size} bytes, expected {expected} (damaged store)")
        self._logits: np.ndarray | None = None
        self._index: np.ndarray | None = None

    def check(self, fingerprint: dict) -> None:
        """Refuse a run whose fingerprint differs from the store's, naming the differing fields."""
        fields = differing_fields(self.meta["fingerprint"], fingerprint)
        if fields:
            raise ValueError(
                f"teacher cache {self.path} was written for another run ({'; '.join(fields)}): write a store "
                "for this run with `distill cache-teacher` and its configs, or drop model.init_args.teacher_cache"
            )

    def _map(self) -> None:
        # copy-on-write maps: pages are read on demand, the files are opened read-only
        shape = (self.layout.rows, self.layout.num_classes)
        self._logits = np.memmap(self.path / "logits.bin", dtype=_NUMPY_VIEW[self.dtype], mode="c", shape=shape)
        self._index = np.memmap(self.path / "index.bin", dtype=np.int32, mode="c", shape=(self.layout.rows,))

    def rows(self, epoch: int, rank: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (in the dtype the teacher produced them) and dataset indices of one batch."""
        if self._logits is None:
            self._map()
        start, stop = self.layout.batch_rows(epoch, rank, batch)
        logits = torch.from_numpy(self._logits[start:stop]).view(STORE_DTYPES[self.dtype])
        logits_dtype = getattr(torch, self.meta["logits_dtype"])
        return logits.to(logits_dtype, copy=True), torch.from_numpy(self._index[start:stop]).long()

    def outputs(self, trainer, index: torch.Tensor, setting) -> StagedOutput:
        """The teacher's output for the training batch ``trainer`` is running (logits only, on ``index``'s device)."""
        epoch, batch, rank = trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_idx, trainer.global_rank
        where = f"teacher cache {self.path}: epoch {epoch}, batch {batch}, rank {rank}"
        layout = self.layout
        if epoch >= layout.epochs or batch >= layout.batches_per_epoch or rank >= layout.world_size:
            raise RuntimeError(
                f"{where} lies outside the stored schedule ({layout.epochs} epochs of {layout.batches_per_epoch} "
                f"batches on {layout.world_size} ranks)"
            )
        if trainer.global_step != layout.global_step(epoch, batch):
            raise RuntimeError(
                f"{where}: the run is at step {trainer.global_step}, the store drew this batch's crops at step "
                f"{layout.global_step(epoch, batch)}"
            )
        stored_setting = self.meta["teacher_settings"][epoch]
        if as_json(setting) != stored_setting:
            raise RuntimeError(f"{where}: the teacher runs as {setting}, the store holds it as {stored_setting}")
        logits, stored_index = self.rows(epoch, rank, batch)
        if not torch.equal(stored_index.to(index.device), index):
            raise RuntimeError(f"{where}: this batch's samples are not those the store holds (another batch sequence)")
        return logits_only(logits.to(index.device, non_blocking=True))
