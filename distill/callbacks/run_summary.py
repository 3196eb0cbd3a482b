"""What a run was and what it reached, in every logger: config and identities at fit start, results at fit end.

At fit start every logger receives the student's parameter count and the teacher's identity
(``teacher_info``: architecture, weights file, SHA-256), and every logger but the CSV one (whose run
directory already holds ``config.yaml``) the full resolved LightningCLI config under ``config``.
At fit end the last and best validation top-1 of every evaluated network, the epochs and the run
time go into ``summary.json`` next to ``config.yaml`` and into W&B's ``run.summary``. Accuracies are
fractions, as logged. The run time adds up the sessions of a resumed run (it is kept in the
checkpoint).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml
from pytorch_lightning import Callback
from pytorch_lightning.cli import SaveConfigCallback
from pytorch_lightning.loggers import CSVLogger, WandbLogger
from torch import nn


def resolved_config(trainer) -> dict | None:
    """The LightningCLI config of this run (what ``config.yaml`` holds); ``None`` outside the CLI."""
    saver = next((cb for cb in trainer.callbacks if isinstance(cb, SaveConfigCallback)), None)
    return None if saver is None else yaml.safe_load(saver.parser.dump(saver.config, skip_none=False))


def identity(pl_module) -> dict:
    """The student's parameter count and the teacher's record, where the module has them."""
    info = {}
    student = getattr(pl_module, "student", None) or getattr(pl_module, "model", None)
    if isinstance(student, nn.Module):
        info["student_params"] = sum(p.numel() for p in student.parameters())
    if getattr(pl_module, "teacher_info", None):
        info["teacher_info"] = dict(pl_module.teacher_info)
    return info


class RunSummary(Callback):
    """Logs the run's config and identity at fit start and writes its results at fit end.

    Args:
        filename: name of the summary written next to ``config.yaml``.
    """

    def __init__(self, filename: str = "summary.json"):
        self.filename = filename
        self.previous_seconds = 0.0  # fit time of earlier sessions of a resumed run
        self.started = time.perf_counter()

    def seconds(self) -> float:
        return self.previous_seconds + time.perf_counter() - self.started

    def on_fit_start(self, trainer, pl_module) -> None:
        self.started = time.perf_counter()
        if not trainer.is_global_zero:
            return
        info, config = identity(pl_module), resolved_config(trainer)
        for logger in trainer.loggers:
            extra = {"config": config} if config is not None and not isinstance(logger, CSVLogger) else {}
            logger.log_hyperparams({**info, **extra})

    def results(self, trainer, pl_module) -> dict:
        out = {}
        for key, best in sorted(getattr(pl_module, "best", {}).items()):  # val/top1, val/<net>_top1
            if key in trainer.callback_metrics:
                out[f"{key}_last"] = float(trainer.callback_metrics[key])
            out[f"{key}_best"] = best
        out.update(epochs=trainer.current_epoch, global_step=trainer.global_step, run_time_s=round(self.seconds(), 1))
        return {**out, **identity(pl_module)}

    def on_fit_end(self, trainer, pl_module) -> None:
        log_dir = trainer.log_dir  # a collective call: every rank
        if not trainer.is_global_zero:
            return
        results = self.results(trainer, pl_module)
        if log_dir is not None:
            path = Path(log_dir) / self.filename
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=2) + "\n")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.summary.update(results)

    def state_dict(self) -> dict:
        return {"seconds": self.seconds()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.previous_seconds = state_dict["seconds"]
