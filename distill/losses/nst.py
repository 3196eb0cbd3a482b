"""NST: neuron selectivity transfer (Huang & Wang, 2017, "Like What You Like")."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import non_negative
from ..models.staged import StagedOutput
from .maps import paired_last, pool_to_smaller
from .term import DistillTerm


def _poly_kernel_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over the batch and every channel pair (i, j) of (⟨a_i, b_j⟩)², a and b (B, C, H·W)."""
    return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()


def nst_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Squared MMD with the degree-2 polynomial kernel k(x, y) = (xᵀy)² between the channels'
    L2-normalised spatial activation maps, for one stage pair.

    As the CRD benchmark's ``NSTLoss``: the larger map is adaptive-average-pooled to the smaller one;
    each of the three kernel terms is averaged over the batch and the channel pairs (student and
    teacher channel counts may differ). Float32 (autocast off), teacher detached.
    """
    with torch.autocast(f_s.device.type, enabled=False):
        f_s, f_t = pool_to_smaller(f_s.float(), f_t.detach().float())
        s = F.normalize(f_s.flatten(2), dim=2)
        t = F.normalize(f_t.flatten(2), dim=2)
        return _poly_kernel_mean(t, t) + _poly_kernel_mean(s, s) - 2 * _poly_kernel_mean(s, t)


class NSTTerm(DistillTerm):
    """NST summed over the paired stage outputs (Huang & Wang, 2017), the CRD benchmark's weight 50."""

    name = "nst"
    reads_teacher = frozenset({"stages"})

    def __init__(self, weight: float = 50.0):
        non_negative("NSTTerm", "weight", weight)
        super().__init__(weight)

    def forward(
        self, student: StagedOutput, teacher: StagedOutput, target: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        return sum(nst_loss(s, t) for s, t in zip(*paired_last(student.stages, teacher.stages)))
