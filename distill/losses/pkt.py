"""PKT: probabilistic knowledge transfer (Passalis & Tefas, 2018)."""

from __future__ import annotations

import torch

from ..models.staged import StagedOutput
from .term import DistillTerm


def cosine_conditional(e: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """P(j | i) ∝ (cos(e_i, e_j) + 1) / 2, each row normalised to sum to one."""
    e = e / (e.norm(dim=1, keepdim=True) + eps)
    sim = (e @ e.t() + 1.0) / 2.0
    return sim / sim.sum(dim=1, keepdim=True)


def pkt_loss(e_s: torch.Tensor, e_t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """KL(P_t ‖ P_s) between the cosine-similarity conditional distributions, averaged over all
    B² entries as the official code does. Float32 (autocast off), teacher detached."""
    with torch.autocast(e_s.device.type, enabled=False):
        p_s = cosine_conditional(e_s.flatten(1).float(), eps)
        p_t = cosine_conditional(e_t.detach().flatten(1).float(), eps)
        return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


class PKTTerm(DistillTerm):
    """Probabilistic knowledge transfer on the pooled embeddings (Passalis & Tefas, 2018)."""

    name = "pkt"
    reads_teacher = frozenset({"embedding"})

    def __init__(self, weight: float = 30000.0):
        super().__init__(weight)

    def forward(
        self, student: StagedOutput, teacher: StagedOutput, target: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        return pkt_loss(student.embedding, teacher.embedding)
