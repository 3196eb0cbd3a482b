"""Stage plans: how a run's epochs divide into stages, and the learning rate within each.

Every method declares its stages (:meth:`DistillModule.stages`): a plain method has one, PWKD one per
teacher width, SSKD one per phase, and a term with an initialisation phase (AB, FT, FSP) puts its
own stage first. The :class:`~distill.callbacks.stages.StagePlan` callback resolves the declared
stages into epochs (:func:`stage_epochs`) and one learning-rate schedule for the whole run
(:class:`StagedSchedule`), a function of the global step, so a run resumed in the middle of a stage
continues exactly; it then tells the module which stage each epoch belongs to.

The LR policy of a stage:

- ``base``: the module's configured ``lr_schedule`` (CRD protocol: ×0.1 at 150/180/210), counted from
  the first stage that is not ``constant``; a one-stage plan is exactly that schedule.
- ``cyclic``: a cosine from the base LR to ``min_lr_factor`` within the stage, restarted at its start
  (PWKD, SSKD), with an optional linear warm-up.
- ``constant``: the base LR throughout (initialisation phases, as in the CRD benchmark's code).
- ``step`` (plan override): ×``step_gamma`` at fixed fractions of the stage, restarted in every stage.
- ``monotone`` (plan override): one cosine over all the stages it replaces.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .errors import ConfigError
from .schedules import Constant, CyclicCosine, MultiStep, Schedule

StageLR = Literal["base", "cyclic", "constant"]
PlanLR = Literal["own", "base", "cyclic", "step", "monotone"]


@dataclass(frozen=True)
class Stage:
    """One stage of a method, as the method declares it.

    Args:
        name: what the stage is, for logs and errors (``width 0.25``, ``stage 1``, ``head``, ``ab init``).
        lr: the stage's own LR policy (see the module docstring).
        epochs: a fixed length (initialisation phases); ``None`` takes an equal share of the epochs the
            fixed stages leave.
        share: instead of ``epochs``, a fixed fraction of ``trainer.max_epochs`` (rounded, at least one
            epoch; SSKD's head phase).
        spec: whatever the method needs to enter the stage (a teacher width, an SSKD phase).
    """

    name: str
    lr: StageLR = "base"
    epochs: int | None = None
    share: float | None = None
    spec: Any = None

    def fixed_epochs(self, max_epochs: int | None) -> int | None:
        """The stage's own length in a run of ``max_epochs``; ``None`` where it shares the rest."""
        if self.epochs is not None or self.share is None or not max_epochs:
            return self.epochs
        return max(1, round(self.share * max_epochs))


def stage_epochs(stages: Sequence[Stage], max_epochs: int | None, epochs: Sequence[int] | None = None) -> list[int]:
    """Epochs of every stage: ``epochs`` when given (one per stage, summing to ``max_epochs``), else each
    fixed stage's own (its ``epochs`` or ``share``) and an equal split of the rest, the first
    ``rest mod n`` shares one epoch longer.

    A one-stage plan without ``epochs`` covers the whole run, whatever ``max_epochs`` is (``[]``: no
    bound). Raises a ValueError naming the stages, the epochs and ``trainer.max_epochs``.
    """
    names = ", ".join(s.name for s in stages)
    if epochs is not None:
        if len(epochs) != len(stages) or any(not isinstance(e, int) or e <= 0 for e in epochs):
            raise ConfigError(
                f"stages.epochs={list(epochs)}: expected {len(stages)} positive epoch counts, one per stage ({names})"
            )
        if sum(epochs) != max_epochs:
            raise ConfigError(
                f"stages.epochs={list(epochs)} sum to {sum(epochs)}, but trainer.max_epochs={max_epochs}: "
                "expected them to be equal"
            )
        return list(epochs)
    if len(stages) == 1 and stages[0].epochs is None:
        return [max_epochs] if max_epochs is not None and max_epochs > 0 else []
    own = [s.fixed_epochs(max_epochs) for s in stages]
    fixed = sum(e for e in own if e is not None)
    shared = [i for i, e in enumerate(own) if e is None]
    rest = (max_epochs or 0) - fixed
    if max_epochs is None or max_epochs <= 0 or rest < len(shared) or (not shared and rest):
        raise ConfigError(
            f"trainer.max_epochs={max_epochs} cannot be split among the {len(stages)} stages ({names}): expected "
            f"{fixed} epochs for the fixed stages plus at least one for each of the other {len(shared)}"
        )
    out = list(own)
    base, extra = divmod(rest, len(shared)) if shared else (0, 0)
    for rank, i in enumerate(shared):
        out[i] = base + (rank < extra)
    return out


class StagedSchedule(Schedule):
    """One LR multiplier over a whole stage plan, a function of the fractional epoch.

    Args:
        bounds: the epoch where each stage starts, then the end of the last.
        policies: the LR policy of each stage (``base``, ``cyclic``, ``constant``, ``step``, ``monotone``).
        base: the module's configured schedule (for ``base`` stages).
        min_factor: the floor of the cosines, as a fraction of the base LR.
        warmup_epochs: linear warm-up at the start of every cosine.
        step_milestones: fractions of a stage where a ``step`` stage drops.
        step_gamma: the factor of each drop.
    """

    def __init__(
        self,
        bounds: Sequence[int],
        policies: Sequence[str],
        base: Schedule,
        min_factor: float = 0.0,
        warmup_epochs: float = 0.0,
        step_milestones: Sequence[float] = (0.625, 0.75, 0.875),
        step_gamma: float = 0.1,
    ):
        if len(bounds) != len(policies) + 1:
            raise ConfigError(f"StagedSchedule needs one policy per stage: bounds {list(bounds)}, policies {policies}")
        self.starts, self.policies = list(bounds[:-1]), list(policies)
        trained = [i for i, p in enumerate(policies) if p != "constant"]
        method_start = bounds[trained[0]] if trained else 0  # "base" and "monotone" count from here
        monotone_end = (
            bounds[max(i for i, p in enumerate(policies) if p == "monotone") + 1] if "monotone" in policies else 0
        )
        self.parts: list[tuple[float, Schedule]] = []  # (offset, schedule of epoch − offset) per stage
        for i, policy in enumerate(policies):
            length = bounds[i + 1] - bounds[i]
            if policy == "base":
                self.parts.append((method_start, base))
            elif policy == "cyclic":
                self.parts.append((bounds[i], CyclicCosine([length], min_factor, warmup_epochs)))
            elif policy == "monotone":
                self.parts.append(
                    (method_start, CyclicCosine([monotone_end - method_start], min_factor, warmup_epochs))
                )
            elif policy == "step":
                self.parts.append((bounds[i], MultiStep([round(f * length) for f in step_milestones], step_gamma)))
            elif policy == "constant":
                self.parts.append((bounds[i], Constant()))
            else:
                raise ConfigError(f"unknown stage LR policy {policy!r}")

    def stage_of(self, epoch: float) -> int:
        return max(0, bisect.bisect_right(self.starts, epoch + 1e-9) - 1)

    def __call__(self, epoch: float) -> float:
        offset, schedule = self.parts[self.stage_of(epoch)]
        return schedule(epoch - offset)
