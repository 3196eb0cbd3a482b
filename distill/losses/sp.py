"""SP: similarity-preserving distillation (Tung & Mori, 2019)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.staged import StagedOutput
from .term import DistillTerm


def similarity_matrix(f: torch.Tensor) -> torch.Tensor:
    """G = row-L2-normalised F·Fᵀ over the batch, F the flattened feature (B, ·)."""
    flat = f.flatten(1)
    return F.normalize(flat @ flat.t(), dim=1)


def sp_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """‖G_t − G_s‖²_F / B². Float32 (autocast off for the Gram products), teacher detached."""
    with torch.autocast(f_s.device.type, enabled=False):
        g_s = similarity_matrix(f_s.float())
        g_t = similarity_matrix(f_t.detach().float())
        return (g_t - g_s).pow(2).sum() / f_s.shape[0] ** 2


class SPTerm(DistillTerm):
    """Similarity preserving on the last-stage feature (Tung & Mori, 2019).

    [chosen] The feature is ``StagedOutput.feature`` (the last stage after the head's final
    norm/activation, before pooling), the map the CRD benchmark uses (its ``feat[-2]``); for
    networks without a final norm it equals the last stage output.
    """

    name = "sp"
    reads_teacher = frozenset({"feature"})

    def __init__(self, weight: float = 3000.0):
        super().__init__(weight)

    def forward(
        self, student: StagedOutput, teacher: StagedOutput, target: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        return sp_loss(student.feature, teacher.feature)
