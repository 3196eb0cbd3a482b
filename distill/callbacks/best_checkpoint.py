"""The best checkpoint (``best-epoch<k>.ckpt`` by ``val/top1``) taken only from epochs that may be the best.

A method says through ``selects_best`` whether the current epoch's validation counts (project
choice): SSKD's backbone phases evaluate the student with an untrained classifier, so only its head
phase may give the best checkpoint and ``val/top1_best``. Every other method counts every epoch, and
this is then Lightning's ``ModelCheckpoint`` unchanged.
"""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint


def selects_best(pl_module: pl.LightningModule) -> bool:
    return getattr(pl_module, "selects_best", True)


class BestCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that skips the epochs whose module says ``selects_best`` is False."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._every_n_train_steps < 1 and self._train_time_interval is None:
            return  # the default: it saves at epoch ends only, so a training batch has nothing to do
        if selects_best(pl_module):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if selects_best(pl_module):
            super().on_train_epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if selects_best(pl_module):
            super().on_validation_end(trainer, pl_module)
