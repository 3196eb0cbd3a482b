"""Checkpoint and stop when the job is told to end (preemption, time limit); resume exactly.

On SIGTERM (preemption, ``scancel``, torchrun shutting down) or SIGUSR1 (SLURM's warning before the
time limit, ``#SBATCH --signal=USR1@90``) the run finishes its current training batch, writes
``last.ckpt`` atomically and exits (status 0); after SIGUSR1 under SLURM it also requeues the job.
``distill fit ... --ckpt_path .../last.ckpt`` then ends with exactly the weights of an uninterrupted
run: the checkpoint holds the training loader's position (``distill.data.distributed``).

How it stops: Lightning ends a fit with ``SIGTERMException`` at the end of a training batch, after
the LR scheduler's step, once ``trainer.received_sigterm`` is set. This callback replaces
Lightning's own SIGTERM handler while training (which sets that flag at once and so also abandons a
running validation), raises the flag at the end of an optimiser step that every rank agrees on,
keeps it down while validation runs, and writes the checkpoint in ``on_exception``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn

from ..errors import ConfigError

REQUEUE_SIGNAL = "SIGUSR1"


def save_atomically(trainer: pl.Trainer, path: Path) -> None:
    """Save the trainer's checkpoint to a temporary file beside ``path``, then rename it over ``path``:
    a write that fails or is killed leaves the previous checkpoint intact. Every rank must call it."""
    tmp = path.with_name(f".{path.name}.tmp")
    if trainer.is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        trainer.save_checkpoint(tmp)  # global rank 0 writes, every rank synchronises
        if trainer.is_global_zero:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        if trainer.is_global_zero:
            tmp.unlink(missing_ok=True)


def slurm_job_id() -> str | None:
    """``<array job>_<task>`` in a job array, else ``SLURM_JOB_ID``; ``None`` outside SLURM."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def requeue_slurm_job(job_id: str) -> None:
    """``scontrol requeue <job_id>``: SLURM ends this job and queues it again, with the same script."""
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    except FileNotFoundError:
        rank_zero_warn(f"could not requeue SLURM job {job_id}: `scontrol` is not on the PATH")
        return
    if result.returncode:
        rank_zero_warn(f"`scontrol requeue {job_id}` failed ({result.returncode}): {result.stderr.strip()}")
    else:
        rank_zero_info(f"requeued SLURM job {job_id}")


class PreemptionCheckpoint(pl.Callback):
    """On ``signals``, checkpoint at the end of the current training step and stop the fit.

    Args:
        dirpath: directory of the checkpoint; default: that of the trainer's ``ModelCheckpoint``
            (``runs/<name>/version_<n>/checkpoints``), else ``<default_root_dir>/checkpoints``.
        filename: checkpoint name; ``last.ckpt`` (the default) is the file a resume points at anyway.
        signals: the signals that stop the run; an empty list turns the callback off.
        requeue: after SIGUSR1, requeue the job with ``scontrol requeue`` when running under SLURM
            (``SLURM_JOB_ID`` set); the requeued script resumes from the checkpoint.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str = "last.ckpt",
        signals: Sequence[str] = ("SIGTERM", REQUEUE_SIGNAL),
        requeue: bool = True,
    ):
        unknown = [name for name in signals if name not in signal.Signals.__members__]
        if unknown:
            raise ConfigError(
                f"PreemptionCheckpoint signals: unknown signal(s) {unknown}: expected names like 'SIGTERM', 'SIGUSR1'"
            )
        self.dirpath, self.filename, self.requeue = dirpath, filename, requeue
        self.signals = [signal.Signals[name] for name in signals]
        self.received: list[int] = []  # signals caught on this rank since training started
        self.stopping = False
        self._previous: dict[int, object] = {}

    # ---- signals ---------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame) -> None:
        self.received.append(signum)

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            rank_zero_warn("PreemptionCheckpoint: not in the main thread, so signals cannot be caught")
            return
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    # ---- hooks -----------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        self.received, self.stopping = [], False
        self._install()  # after Lightning's own handlers, which it installs before training starts

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.signals or self.stopping or (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # stop only after an optimiser step: accumulated gradients are not checkpointed
        if trainer.world_size == 1 and not self.received:
            return  # a single process decides alone: no signal, nothing to do
        if trainer.strategy.reduce_boolean_decision(bool(self.received), all=False):
            self.stopping = True
            self._raise_flag(trainer, True)  # Lightning stops after this step's LR update

    def on_validation_start(self, trainer, pl_module) -> None:
        if self.stopping:
            self._raise_flag(trainer, False)  # let the validation due after this step finish

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.stopping:
            self._raise_flag(trainer, True)

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore()
        if not (self.stopping and isinstance(exception, SIGTERMException)):
            return
        path = self.checkpoint_path(trainer)
        save_atomically(trainer, path)
        rank_zero_info(
            f"stopped by a signal at step {trainer.global_step}: wrote {path}, resume with --ckpt_path {path}"
        )
        job_id = slurm_job_id()
        if self.requeue and job_id and trainer.is_global_zero and signal.Signals[REQUEUE_SIGNAL] in self.received:
            requeue_slurm_job(job_id)

    # ---- helpers ---------------------------------------------------------------------------
    @staticmethod
    def _raise_flag(trainer: pl.Trainer, value: bool) -> None:
        trainer._signal_connector.received_sigterm = value  # what Lightning's SIGTERM handler sets

    def checkpoint_path(self, trainer: pl.Trainer) -> Path:
        dirpath = self.dirpath or getattr(trainer.checkpoint_callback, "dirpath", None)
        return Path(dirpath or Path(trainer.default_root_dir) / "checkpoints") / self.filename
