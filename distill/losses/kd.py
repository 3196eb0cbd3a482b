"""KD: soft-target distillation (Hinton et al., 2015)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import checks
from ..models.staged import StagedOutput
from .term import DistillTerm


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """τ² · KL(softmax(z_t/τ) ‖ softmax(z_s/τ)), summed over classes, averaged over the batch.

    The τ² factor keeps the gradient scale independent of τ. Computed in float32; the teacher
    side is detached.
    """
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


class KDTerm(DistillTerm):
    """KD on the logits (Hinton et al., 2015)."""

    name = "kd"
    reads_teacher = frozenset({"logits"})

    def __init__(self, weight: float = 0.9, temperature: float = 4.0):
        super().__init__(weight)
        checks.positive("KDTerm", "temperature", temperature)
        self.temperature = temperature

    def forward(
        self, student: StagedOutput, teacher: StagedOutput, target: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        return kd_loss(student.logits, teacher.logits, self.temperature)
