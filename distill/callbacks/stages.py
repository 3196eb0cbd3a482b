"""The one stage mechanism: every fit runs through a :class:`StagePlan`, the ``--stages.*`` argument group.

The module declares its stages (:meth:`~distill.methods.base.DistillModule.stages`); the plan
gives them epochs, sets the module's ``stage_schedule`` to one :class:`~distill.stages.StagedSchedule`
before the optimiser exists (only where the plan has more than one stage or overrides the LR; the
configured ``lr_schedule`` then shapes its ``base`` stages), and
at every epoch start (and before the sanity check) calls ``module.on_stage(index, stage)`` with the
stage that contains ``current_epoch``. Both are functions of the epoch counter and the global step,
so a run resumed in the middle of a stage continues exactly (the schedule cannot be swapped on resume:
``configure_optimizers`` runs before the counters are restored). The resolved plan is stored in the
checkpoint; resuming under another plan is refused.

Because the plan is a fixed argument group (like ``--checkpoint.*``), each field can be set from any
config file or the command line on its own (``--stages.lr monotone``), so ablation files stack.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytorch_lightning as pl
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from .. import checks
from ..errors import ConfigError
from ..stages import PlanLR, Stage, StagedSchedule, stage_epochs

PLAN_LR = ("own", "base", "cyclic", "step", "monotone")


class StagePlan(pl.Callback):
    """Epochs and learning rate of every stage a method declares.

    Args:
        epochs: epochs of every stage in order, summing to ``trainer.max_epochs``; default: stages with
            a fixed length (initialisation phases) keep it and the others share the rest equally
            ([chosen] PWKD: 4 × 60 of 240; SSKD: 3 stages + head = 4 × 60).
        lr: ``own`` (default): every stage's own policy (PWKD and SSKD stages: ``cyclic``; plain
            methods: ``base``). Any other value replaces the policy of every stage that is not
            ``constant`` (initialisation phases keep theirs): ``cyclic`` restarts a cosine per stage,
            ``monotone`` (PWKD ablation) runs one cosine over them, ``step`` (SSKD ablation) drops
            ×``step_gamma`` at ``step_milestones`` of each stage, ``base`` keeps the module's
            configured schedule (PWKD's plain-schedule baseline).
        min_lr_factor: the floor of every cosine as a fraction of the base LR ([chosen] 0).
        warmup_epochs: linear warm-up at the start of every cosine ([chosen] 0: none).
        step_milestones: fractions of a stage where ``step`` drops (default: the CRD protocol's
            150/180/210 of 240).
        step_gamma: the factor of each ``step`` drop.
    """

    def __init__(
        self,
        epochs: list[int] | None = None,
        lr: PlanLR = "own",
        min_lr_factor: float = 0.0,
        warmup_epochs: float = 0.0,
        step_milestones: Sequence[float] = (0.625, 0.75, 0.875),
        step_gamma: float = 0.1,
    ):
        if epochs is not None:
            checks.positive_ints("StagePlan", "epochs", epochs)
        checks.choice("StagePlan", "lr", lr, PLAN_LR)
        checks.fraction("StagePlan", "min_lr_factor", min_lr_factor, zero=True)
        checks.non_negative("StagePlan", "warmup_epochs", warmup_epochs)
        checks.ordered("StagePlan", "step_milestones", step_milestones, strict=True)
        for milestone in step_milestones:
            checks.fraction("StagePlan", "step_milestones", milestone, one=False)
        checks.positive("StagePlan", "step_gamma", step_gamma)
        self.epochs = None if epochs is None else list(epochs)
        self.lr, self.min_lr_factor, self.warmup_epochs = lr, min_lr_factor, warmup_epochs
        self.step_milestones, self.step_gamma = list(step_milestones), step_gamma
        self.stages: list[Stage] = []
        self.bounds: list[int] = []
        self.plan: dict = {}

    def policies(self) -> list[str]:
        return [s.lr if self.lr == "own" or s.lr == "constant" else self.lr for s in self.stages]

    @property
    def multi_stage(self) -> bool:
        return len(self.stages) > 1

    def stage_of(self, epoch: int) -> int:
        if not self.multi_stage:
            return 0
        return min(sum(start <= epoch for start in self.bounds[1:-1]), len(self.stages) - 1)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        self.stages = list(pl_module.stages())
        epochs = stage_epochs(self.stages, trainer.max_epochs, self.epochs)
        self.bounds = [0, *itertools.accumulate(epochs)]
        policies = self.policies()
        pl_module.stage_schedule = None
        if self.multi_stage or policies != ["base"]:
            if not epochs:
                raise ConfigError(f"stages.lr={self.lr!r} needs a finite trainer.max_epochs to shape the LR over")
            configured = type(pl_module.lr_schedule).__name__
            pl_module.stage_schedule = StagedSchedule(
                self.bounds, policies, pl_module.lr_schedule, self.min_lr_factor, self.warmup_epochs,
                self.step_milestones, self.step_gamma,
            )  # fmt: skip
            rank_zero_info(
                f"StagePlan: {type(pl_module).__name__} stages "
                + ", ".join(f"{s.name} ({e} epochs, {p})" for s, e, p in zip(self.stages, epochs, policies))
                + f"; the configured lr_schedule ({configured}) applies to 'base' stages only"
            )
        self.plan = {"stages": [s.name for s in self.stages], "lr": policies}
        if self.multi_stage or policies != ["base"]:  # the LR shape depends on the epochs: they may not change
            self.plan["epochs"] = epochs
        pl_module.prepare_stages(self.stages, self.bounds)

    def enter(self, trainer, pl_module) -> None:
        """Enter the stage that contains ``trainer.current_epoch`` (also the teacher cache's replay)."""
        if self.stages:
            index = self.stage_of(trainer.current_epoch)
            pl_module.on_stage(index, self.stages[index])

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self.enter(trainer, pl_module)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.enter(trainer, pl_module)
        if self.multi_stage:
            pl_module.log("stage", float(self.stage_of(trainer.current_epoch)), on_epoch=True, on_step=False)

    def state_dict(self) -> dict:
        return dict(self.plan)

    def load_state_dict(self, state_dict: dict) -> None:
        """A fit resumes only under the plan it was trained with."""
        if state_dict and self.plan and state_dict != self.plan:  # validate/test set up no plan
            raise ConfigError(
                f"the stage plan {self.plan} differs from the checkpoint's {state_dict}; resume with the same "
                "stages, stages.epochs, stages.lr and trainer.max_epochs"
            )
