"""The stages of PWKD (Zhang, Zhang, Sun, 2021, "Partial to Whole Knowledge Distillation";
METHODS.md §3): teacher widths narrow to wide, one cosine LR cycle per stage."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from typing import Literal

import pytorch_lightning as pl

from .. import checks
from ..errors import ConfigError
from ..methods.pwkd import PWKD
from ..schedules import CyclicCosine


class PWKDStages(pl.Callback):
    """Drives a :class:`~distill.methods.pwkd.PWKD` model through its stages.

    Stage ``k`` lasts ``epochs[k]`` epochs with the teacher at ``widths[k]``. The stage is derived
    from ``trainer.current_epoch`` at every epoch start, and the LR is one function of the global
    step (set as the model's ``lr_schedule`` before the optimiser exists, replacing the configured
    one), so a run resumed mid-stage continues exactly; resuming under other stages is refused.
    The optimiser (its momentum) is the same object across stages.

    Args:
        widths: teacher width of each stage, narrow to whole, ending at 1.0 ([chosen] default
            0.25, 0.5, 0.75, 1.0). Repeats are allowed: ``[1.0, 1.0, 1.0, 1.0]`` is the whole-only
            ablation with the same cyclic schedule.
        epochs: epochs of each stage, summing to ``trainer.max_epochs``; [chosen] default an equal
            split (CIFAR: 4 × 60 = 240), the first ``max_epochs mod n`` stages one epoch longer.
        schedule: ``cyclic`` (default; [chosen] cosine shape): cosine from the base LR to
            ``min_factor`` within each stage, restarting at every boundary; ``monotone`` (ablation):
            [chosen] one cosine over all stages;
            ``base``: keep the model's configured ``lr_schedule`` (with ``widths: [1.0]``, the plain
            base method against the whole slimmable teacher, the baseline METHODS.md §3 asks for).
        min_factor: the LR at the end of a cycle as a fraction of the base LR ([chosen] 0).
        warmup_epochs: linear warm-up at the start of each cycle ([chosen] 0: none).
        reverse_order: the reversed-order ablation: widths whole to narrow, starting at 1.0.
    """

    def __init__(
        self,
        widths: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
        epochs: Sequence[int] | None = None,
        schedule: Literal["cyclic", "monotone", "base"] = "cyclic",
        min_factor: float = 0.0,
        warmup_epochs: float = 0.0,
        reverse_order: bool = False,
    ):
        self.widths = [float(w) for w in widths]
        for width in self.widths:
            checks.fraction("PWKDStages", "widths", width)
        checks.ordered("PWKDStages", "widths", self.widths, descending=reverse_order)
        if self.widths[0 if reverse_order else -1] != 1.0:
            checks.fail("PWKDStages", "widths", self.widths, "the whole width 1.0 last (first with reverse_order)")
        if epochs is not None:
            checks.positive_ints("PWKDStages", "epochs", epochs, len(self.widths))
        checks.choice("PWKDStages", "schedule", schedule, ("cyclic", "monotone", "base"))
        checks.fraction("PWKDStages", "min_factor", min_factor, zero=True)
        checks.non_negative("PWKDStages", "warmup_epochs", warmup_epochs)
        self.epochs = None if epochs is None else [int(e) for e in epochs]
        self.schedule, self.min_factor, self.warmup_epochs = schedule, min_factor, warmup_epochs
        self.starts: list[int] = []
        self.plan: dict = {}

    def stage_epochs(self, max_epochs: int | None) -> list[int]:
        """Epochs of every stage for a run of ``max_epochs``, or a ValueError naming both."""
        n = len(self.widths)
        if self.epochs is None:
            if not max_epochs or max_epochs < n:
                raise ConfigError(
                    f"trainer.max_epochs={max_epochs} is fewer epochs than the {n} PWKD stages {self.widths}"
                )
            return [max_epochs // n + (k < max_epochs % n) for k in range(n)]
        checks.sums_to("PWKDStages", "epochs", self.epochs, max_epochs, "trainer.max_epochs")
        return list(self.epochs)

    def stage_of(self, epoch: int) -> int:
        return min(bisect.bisect_right(self.starts, epoch) - 1, len(self.widths) - 1)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not isinstance(pl_module, PWKD):
            raise TypeError(
                f"PWKDStages drives a distill.methods.pwkd.PWKD model, got {type(pl_module).__name__}; "
                "compose lightning_configs/pwkd/... after the method file"
            )
        epochs = self.stage_epochs(trainer.max_epochs)
        self.plan = {"widths": self.widths, "epochs": epochs}
        self.starts = [0, *itertools.accumulate(epochs)][:-1]
        if self.schedule != "base":
            cycles = epochs if self.schedule == "cyclic" else [sum(epochs)]
            pl_module.lr_schedule = CyclicCosine(cycles, self.min_factor, self.warmup_epochs)
        pl_module.prepare_stages(self.widths)

    def state_dict(self) -> dict:
        return dict(self.plan)

    def load_state_dict(self, state_dict: dict) -> None:
        """A run resumes only under the stages it was trained with."""
        if state_dict != self.plan:
            raise ConfigError(
                f"the PWKD stages {self.plan} differ from the checkpoint's {state_dict}; "
                "resume with the same widths and epochs"
            )

    def _enter(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        k = self.stage_of(trainer.current_epoch)
        pl_module.enter_stage(k, self.widths[k])

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._enter(trainer, pl_module)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._enter(trainer, pl_module)
