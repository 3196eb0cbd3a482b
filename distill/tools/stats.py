"""Paired comparisons of runs over seeds: the mean difference and its 95 % confidence interval.

Two methods run with the same seeds are compared seed by seed (the difference of each seed's two
numbers), which removes what the seed shares between them (the subset, the data order). The
interval is Student's t with n − 1 degrees of freedom over the n per-seed differences; a difference
is *resolved* when its interval excludes 0.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from scipy.stats import t as student_t


@dataclass(frozen=True)
class PairedDifference:
    """Mean of the per-seed differences ``a − b`` and its confidence interval."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def resolved(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"


def paired_difference(a: dict[int, float], b: dict[int, float], level: float = 0.95) -> PairedDifference:
    """The per-seed differences ``a[s] − b[s]`` over the seeds both have (at least 2)."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        raise ValueError(f"a paired difference needs at least 2 shared seeds, got {seeds}")
    differences = [a[s] - b[s] for s in seeds]
    mean = statistics.fmean(differences)
    quantile = float(student_t.ppf(0.5 + level / 2, len(seeds) - 1))
    half = quantile * statistics.stdev(differences) / math.sqrt(len(seeds))
    return PairedDifference(mean, mean - half, mean + half, len(seeds))
