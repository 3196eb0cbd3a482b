"""Mark the epoch a run resumed in the middle of: its epoch aggregates cover only part of it.

A fit stopped mid-epoch (preemption) and resumed from that checkpoint trains the rest of the epoch
exactly, but the epoch means Lightning logs at the epoch's end (``train/loss_epoch``,
``train/top1``, …) average only the batches trained after the resume: the accumulators of the
batches before it are not in the checkpoint. [chosen] Rather than restore them, the epoch is marked:
its ``metrics.csv`` row (every logger's epoch-end record) gets ``train/epoch_resumed_at_batch`` = the
index of the first batch trained after the resume (> 0). Complete epochs log nothing, so the column
exists only in runs that resumed mid-epoch. Validation metrics are unaffected (a full pass every time).
"""

from __future__ import annotations

import pytorch_lightning as pl

RESUMED_AT = "train/epoch_resumed_at_batch"


class PartialEpochMarker(pl.Callback):
    """Logs :data:`RESUMED_AT` at the end of an epoch whose first batches were trained before a resume."""

    def __init__(self):
        self.first_batch: int | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.first_batch = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self.first_batch is None:
            self.first_batch = batch_idx  # Lightning counts on from the restored position

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.first_batch:
            pl_module.log(RESUMED_AT, float(self.first_batch), on_step=False, on_epoch=True, sync_dist=False)
