"""Loggers the CLI uses by default."""

from __future__ import annotations

import csv

from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        """Keep an existing ``metrics.csv`` and its columns (Lightning's writer deletes it)."""
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
                self.metrics_keys = next(csv.reader(handle), [])

    def save(self) -> None:
        """As Lightning's, except that ``hparams.yaml`` is written only once hyper-parameters were logged: a
        resume refused while the checkpoint is restored leaves the run's file as it was."""
        if self.hparams:
            super().save()
        else:
            super(ExperimentWriter, self).save()  # the metrics only


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSVLogger, except that a fit resumed in its run directory appends to ``metrics.csv``
    instead of deleting the epochs logged before the resume."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
