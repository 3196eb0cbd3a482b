"""The phases of SSKD (Gao, Shen, et al., 2018, "Stage-by-stage knowledge distillation"): how many
epochs each one gets, and one learning-rate cycle per phase, restarted at every phase boundary.

The callback hands the epochs to :class:`~distill.methods.sskd.SSKD`, which derives its phase from
``current_epoch``, and replaces the module's ``lr_schedule`` in ``setup`` (before
``configure_optimizers``). Both are functions of the epoch counter and the global step, so a run
resumed in the middle of a phase continues exactly (DESIGN.md, resume pitfall). The epochs are
stored in the checkpoint; resuming with other phase epochs is refused.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import Literal

import pytorch_lightning as pl
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from ..methods.sskd import SSKD, default_phase_epochs
from ..schedules import CyclicCosine, Schedule


class PhaseMultiStep(Schedule):
    """×``gamma`` at fixed fractions of every phase (changing at epoch starts), restarted in each phase."""

    def __init__(
        self, phase_epochs: Sequence[int], milestones: Sequence[float] = (0.625, 0.75, 0.875), gamma: float = 0.1
    ):
        self.bounds = [sum(phase_epochs[:i]) for i in range(len(phase_epochs) + 1)]
        self.milestones = [[round(f * length) for f in milestones] for length in phase_epochs]
        self.gamma = gamma

    def __call__(self, epoch: float) -> float:
        k = min(bisect.bisect_right(self.bounds, epoch + 1e-9) - 1, len(self.milestones) - 1)
        local_epoch = math.floor(epoch + 1e-9) - self.bounds[k]
        return self.gamma ** sum(local_epoch >= m for m in self.milestones[k])


class SSKDPhases(pl.Callback):
    """Epochs and LR cycle of every SSKD phase.

    Args:
        epochs: epochs of every phase in order (the paper's plan: one per student stage, then the
            head); they must sum to ``trainer.max_epochs``. Default [chosen]: 10% of ``max_epochs``
            to the head phase, the rest split equally among the phases before it
            (:func:`~distill.methods.sskd.default_phase_epochs`; CIFAR ResNets: 72/72/72/24 of 240).
        lr_schedule: ``cosine`` [chosen]: from the base LR to ``min_lr_factor`` × base within every
            phase; ``step``: ×``step_gamma`` at the fractions ``step_milestones`` of every phase.
        min_lr_factor: the cosine's floor, as a fraction of the base LR.
        warmup_epochs: linear warm-up at the start of every phase (cosine only).
        step_milestones: fractions of a phase where the step schedule drops (default: the CRD
            protocol's 150/180/210 of 240).
        step_gamma: the step schedule's factor.
    """

    def __init__(
        self,
        epochs: list[int] | None = None,
        lr_schedule: Literal["cosine", "step"] = "cosine",
        min_lr_factor: float = 0.0,
        warmup_epochs: float = 0.0,
        step_milestones: Sequence[float] = (0.625, 0.75, 0.875),
        step_gamma: float = 0.1,
    ):
        if epochs is not None and (not epochs or any(not isinstance(e, int) or e <= 0 for e in epochs)):
            raise ValueError(f"SSKDPhases epochs={epochs}: expected a list of positive epoch counts, one per phase")
        if lr_schedule not in ("cosine", "step"):
            raise ValueError(f"SSKDPhases lr_schedule={lr_schedule!r}: expected 'cosine' or 'step'")
        if not 0.0 <= min_lr_factor <= 1.0:
            raise ValueError(f"SSKDPhases min_lr_factor={min_lr_factor}: expected a fraction of the base LR in [0, 1]")
        if warmup_epochs < 0:
            raise ValueError(f"SSKDPhases warmup_epochs={warmup_epochs}: expected a non-negative number of epochs")
        if list(step_milestones) != sorted(step_milestones) or any(not 0 < f < 1 for f in step_milestones):
            raise ValueError(
                f"SSKDPhases step_milestones={list(step_milestones)}: expected increasing fractions in (0, 1)"
            )
        self.epochs = list(epochs) if epochs is not None else None
        self.lr_schedule, self.min_lr_factor, self.warmup_epochs = lr_schedule, min_lr_factor, warmup_epochs
        self.step_milestones, self.step_gamma = list(step_milestones), step_gamma
        self.phase_epochs: list[int] | None = None
        self.announced = False

    def resolve_epochs(self, module: SSKD, max_epochs: int | None) -> list[int]:
        """The epochs of every phase, checked against the module's phases and ``max_epochs``."""
        n = len(module.phases)
        phases = f"{n} phases ({module.phase_names()})"
        if max_epochs is None or max_epochs < 0:
            raise ValueError(
                f"SSKDPhases needs a finite trainer.max_epochs to split among the {phases}, got {max_epochs}"
            )
        if self.epochs is None:
            if max_epochs < n:
                raise ValueError(
                    f"trainer.max_epochs={max_epochs} cannot be split among the {phases}: expected at least {n}"
                )
            return default_phase_epochs(max_epochs, n)
        if len(self.epochs) != n:
            raise ValueError(
                f"SSKDPhases epochs={self.epochs} has {len(self.epochs)} entries, but the model has {phases}"
            )
        if sum(self.epochs) != max_epochs:
            raise ValueError(
                f"SSKDPhases epochs={self.epochs} sum to {sum(self.epochs)}, but trainer.max_epochs={max_epochs}: "
                "expected them to be equal"
            )
        return list(self.epochs)

    def make_schedule(self, phase_epochs: list[int]) -> Schedule:
        if self.lr_schedule == "step":
            return PhaseMultiStep(phase_epochs, self.step_milestones, self.step_gamma)
        return CyclicCosine(phase_epochs, self.min_lr_factor, self.warmup_epochs)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        if not isinstance(pl_module, SSKD):
            raise TypeError(f"SSKDPhases drives distill.methods.sskd.SSKD, but the model is {type(pl_module).__name__}")
        self.phase_epochs = self.resolve_epochs(pl_module, trainer.max_epochs)
        self.announced = False
        pl_module.set_phase_epochs(self.phase_epochs)
        replaced = type(pl_module.lr_schedule).__name__
        pl_module.lr_schedule = self.make_schedule(self.phase_epochs)
        rank_zero_info(
            f"SSKDPhases: epochs per phase {self.phase_epochs} ({pl_module.phase_names()}); the model's "
            f"lr_schedule ({replaced}) is replaced by a {self.lr_schedule} cycle restarted in every phase"
        )

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        index, epoch = pl_module.phase_index, trainer.current_epoch
        start, end = pl_module.phase_bounds[index], pl_module.phase_bounds[index + 1]
        if epoch == start or not self.announced:
            resumed = "" if epoch == start else f", resumed at epoch {epoch}"
            rank_zero_info(f"{pl_module.describe_phase()} (epochs {start}-{end - 1}{resumed})")
            self.announced = True

    def state_dict(self) -> dict:
        return {"phase_epochs": self.phase_epochs}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("phase_epochs")
        if saved != self.phase_epochs:
            raise ValueError(
                f"the checkpoint was trained with SSKD phase epochs {saved}, this run has {self.phase_epochs}: "
                "resume with the same epochs (and trainer.max_epochs)"
            )
