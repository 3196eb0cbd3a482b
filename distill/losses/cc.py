"""CC: correlation congruence (Peng et al., ICCV 2019), the CRD benchmark's variant."""

from __future__ import annotations

import torch
from torch import nn

from ..checks import non_negative, positive
from ..models.staged import StagedOutput
from .term import DistillTerm


def cc_loss(e_s: torch.Tensor, e_t: torch.Tensor) -> torch.Tensor:
    """Mean over consecutive sample pairs (i, i + 1) of Σ_d |e_s − e_t|_{i,d} · |e_s − e_t|_{i+1,d}.

    The CRD benchmark's ``Correlation`` loss (code the CC authors shared with it), not the paper's
    kernel correlation matrix. ``e_s`` and ``e_t`` are (B, D) linear embeddings of the student and
    the teacher; both sides carry gradients (both embeddings are trained). Float32 (autocast off).
    """
    with torch.autocast(e_s.device.type, enabled=False):
        delta = (e_s.float() - e_t.float()).abs()
        return (delta[:-1] * delta[1:]).sum(dim=1).mean()


class CCTerm(DistillTerm):
    """Correlation congruence on the pooled embeddings, the CRD benchmark's variant and weight (0.02).

    Both embeddings go through their own trainable linear map to ``feat_dim`` (128, no
    normalisation, the benchmark's ``LinearEmbed``); the teacher's embedding is detached before its map.
    """

    name = "cc"
    reads_teacher = frozenset({"embedding"})

    def __init__(self, weight: float = 0.02, feat_dim: int = 128):
        non_negative("CCTerm", "weight", weight)
        positive("CCTerm", "feat_dim", feat_dim)
        super().__init__(weight)
        self.feat_dim = feat_dim
        self.embed_s: nn.Module | None = None
        self.embed_t: nn.Module | None = None

    def build(self, student: StagedOutput, teacher: StagedOutput) -> None:
        device = student.embedding.device
        self.embed_s = nn.Linear(student.embedding.shape[1], self.feat_dim).to(device)
        self.embed_t = nn.Linear(teacher.embedding.shape[1], self.feat_dim).to(device)

    def forward(
        self, student: StagedOutput, teacher: StagedOutput, target: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        return cc_loss(self.embed_s(student.embedding), self.embed_t(teacher.embedding.detach()))
