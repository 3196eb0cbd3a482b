"""Learning-rate schedules as pure functions of the (fractional) epoch.

The engine steps the LR every optimiser step with ``factor = schedule(step / steps_per_epoch)``, so a
schedule is one function of the global step: a resumed run gets exactly the LR it would have had,
and multi-stage methods (PWKD, SSKD) restart their cycles without swapping schedulers
(docs/design.md#resume). Each returns a multiplier of the base LR.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

from . import checks


def _warmup(epoch: float, warmup_epochs: float) -> float:
    return min(1.0, (epoch + 1e-12) / warmup_epochs) if warmup_epochs > 0 else 1.0


class Schedule:
    def __call__(self, epoch: float) -> float:
        raise NotImplementedError


class Constant(Schedule):
    def __call__(self, epoch: float) -> float:
        return 1.0


class MultiStep(Schedule):
    """×``gamma`` at each milestone epoch (CRD protocol: 150, 180, 210), changing at epoch starts."""

    def __init__(self, milestones: Sequence[int] = (150, 180, 210), gamma: float = 0.1, warmup_epochs: float = 0.0):
        if milestones:
            checks.ordered("MultiStep", "milestones", milestones)
        checks.positive("MultiStep", "gamma", gamma)
        checks.non_negative("MultiStep", "warmup_epochs", warmup_epochs)
        self.milestones, self.gamma, self.warmup_epochs = list(milestones), gamma, warmup_epochs

    def __call__(self, epoch: float) -> float:
        drops = bisect.bisect_right(self.milestones, math.floor(epoch + 1e-9))
        return self.gamma**drops * _warmup(epoch, self.warmup_epochs)


class CyclicCosine(Schedule):
    """Cosine from the base LR to ``min_factor`` within each cycle, restarted at every boundary.

    ``cycle_epochs`` lists the length of each cycle (PWKD: one per teacher width; SSKD: one per
    phase). With a single cycle this is plain cosine annealing. After the last cycle the factor
    stays at ``min_factor``. Optional linear warm-up at the start of every cycle.
    """

    def __init__(self, cycle_epochs: Sequence[int], min_factor: float = 0.0, warmup_epochs: float = 0.0):
        if not cycle_epochs:
            checks.fail("CyclicCosine", "cycle_epochs", list(cycle_epochs), "a non-empty list of epoch counts > 0")
        for length in cycle_epochs:
            checks.positive("CyclicCosine", "cycle_epochs", length)
        checks.fraction("CyclicCosine", "min_factor", min_factor, zero=True)
        checks.non_negative("CyclicCosine", "warmup_epochs", warmup_epochs)
        self.cycle_epochs, self.min_factor, self.warmup_epochs = list(cycle_epochs), min_factor, warmup_epochs
        self.bounds = [0]
        for length in self.cycle_epochs:
            self.bounds.append(self.bounds[-1] + length)

    def cycle_of(self, epoch: float) -> int:
        """Index of the cycle that contains ``epoch`` (the last one past the end)."""
        return min(bisect.bisect_right(self.bounds, epoch + 1e-9) - 1, len(self.cycle_epochs) - 1)

    def __call__(self, epoch: float) -> float:
        k = self.cycle_of(epoch)
        t = min(1.0, (epoch - self.bounds[k]) / self.cycle_epochs[k])
        cosine = self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * t))
        return cosine * _warmup(epoch - self.bounds[k], self.warmup_epochs)
