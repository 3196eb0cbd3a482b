"""Each segment of a run keeps its own resolved config, written only once the segment really starts.

Lightning's ``SaveConfigCallback`` writes ``config.yaml`` at setup, before a checkpoint is restored,
and a resumed fit overwrites the first segment's file. Here a fit writes its config when training
starts (after the checkpoint was restored and the sanity check passed), to ``config.yaml`` in a new
run directory and to ``config.resume-<n>.yaml`` (n = 1, 2, …) in one that has it, so a start that
fails writes nothing and every segment's arguments stay on record. ``validate``/``test``/``predict``
write theirs at setup, likewise. The resolved config also travels in every checkpoint
(:data:`distill.resume.CONFIG_STATE_KEY`), where a resume compares it with its own.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pytorch_lightning.cli import SaveConfigCallback

from ..resume import CONFIG_STATE_KEY

FIRST = "config.yaml"


def segment_config_name(log_dir: str | Path) -> str:
    """``config.yaml`` if ``log_dir`` has none, else the next free ``config.resume-<n>.yaml``."""
    log_dir = Path(log_dir)
    if not (log_dir / FIRST).exists():
        return FIRST
    taken = {p.name for p in log_dir.glob("config.resume-*.yaml")}
    return next(f"config.resume-{n}.yaml" for n in range(1, len(taken) + 2) if f"config.resume-{n}.yaml" not in taken)


class RunConfig(SaveConfigCallback):
    """``SaveConfigCallback`` writing one file per segment of a run, at its start (module docstring)."""

    @property
    def state_key(self) -> str:
        return CONFIG_STATE_KEY

    def resolved(self) -> dict:
        """The resolved config as ``config.yaml`` holds it."""
        if not hasattr(self, "_resolved"):
            self._resolved = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        return self._resolved

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            self._write(trainer)

    def on_train_start(self, trainer, pl_module) -> None:
        self._write(trainer)

    def _write(self, trainer) -> None:
        if self.already_saved:
            return
        log_dir = trainer.log_dir  # a collective call: every rank
        if trainer.is_global_zero and log_dir is not None:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            path = Path(log_dir) / segment_config_name(log_dir)
            self.parser.save(self.config, path, skip_none=False, multifile=self.multifile)
        self.already_saved = True

    def state_dict(self) -> dict:
        return {"config": self.resolved()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Nothing to restore: the CLI compared the stored config with this run's before anything ran."""
