"""RKD: relational knowledge distillation (Park et al., 2019)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import checks
from ..models.staged import StagedOutput
from .term import DistillTerm


def pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distance matrix of the rows of ``e`` (zero diagonal)."""
    sq = e.pow(2).sum(dim=1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


def _normalised_distances(e: torch.Tensor) -> torch.Tensor:
    d = pairwise_distances(e)
    return d / d[d > 0].mean()


def _angles(e: torch.Tensor) -> torch.Tensor:
    """cos∠(e_j − e_i, e_k − e_i) for every triplet (i, j, k), flattened to (B³,)."""
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()


def rkd_loss(
    e_s: torch.Tensor, e_t: torch.Tensor, distance_weight: float = 25.0, angle_weight: float = 50.0
) -> torch.Tensor:
    """distance_weight · smooth-L1(distance potentials) + angle_weight · smooth-L1(angle potentials).

    Distances are divided by their mean over distinct pairs; the teacher side runs without grad.
    Float32 (autocast off).
    """
    with torch.autocast(e_s.device.type, enabled=False):
        s = e_s.flatten(1).float()
        with torch.no_grad():
            t = e_t.flatten(1).float()
            t_d, t_a = _normalised_distances(t), _angles(t)
        loss_d = F.smooth_l1_loss(_normalised_distances(s), t_d)
        loss_a = F.smooth_l1_loss(_angles(s), t_a)
        return distance_weight * loss_d + angle_weight * loss_a


class RKDTerm(DistillTerm):
    """Relational KD on the pooled embeddings (Park et al., 2019)."""

    name = "rkd"
    reads_teacher = frozenset({"embedding"})

    def __init__(self, weight: float = 1.0, distance_weight: float = 25.0, angle_weight: float = 50.0):
        super().__init__(weight)
        checks.non_negative("RKDTerm", "distance_weight", distance_weight)
        checks.non_negative("RKDTerm", "angle_weight", angle_weight)
        self.distance_weight, self.angle_weight = distance_weight, angle_weight

    def forward(
        self, student: StagedOutput, teacher: StagedOutput, target: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        return rkd_loss(student.embedding, teacher.embedding, self.distance_weight, self.angle_weight)
