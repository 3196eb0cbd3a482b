"""KD: soft-target distillation (Hinton et al., 2015), with optional logit standardisation (Sun et al., 2024)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import non_negative, positive
from ..models.staged import StagedOutput
from .term import DistillTerm


def standardize_logits(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Z-score of each sample's logits, (z − mean) / (std + eps), the std with Bessel's correction.

    Logit standardisation (Sun et al., CVPR 2024), as its official code (``normalize``): applied to
    student and teacher alike before the temperature.
    """
    mean = logits.mean(dim=1, keepdim=True)
    return (logits - mean) / (logits.std(dim=1, keepdim=True) + eps)


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0, standardize: bool = False
) -> torch.Tensor:
    """τ² · KL(softmax(z_t/τ) ‖ softmax(z_s/τ)), summed over classes, averaged over the batch.

    The τ² factor keeps the gradient scale independent of τ. With ``standardize`` both logit vectors
    are z-scored first (:func:`standardize_logits`). Computed in float32; the teacher side is detached.
    """
    z_s, z_t = student_logits.float(), teacher_logits.detach().float()
    if standardize:
        z_s, z_t = standardize_logits(z_s), standardize_logits(z_t)
    log_p_s = F.log_softmax(z_s / temperature, dim=1)
    log_p_t = F.log_softmax(z_t / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


class KDTerm(DistillTerm):
    """KD on the logits (Hinton et al., 2015); ``standardize`` turns on logit standardisation
    (Sun et al., 2024; ``methods/kd_ls.yaml``: τ = 2, weight 9, CE 0.1, the official defaults)."""

    name = "kd"
    reads_teacher = frozenset({"logits"})

    def __init__(self, weight: float = 0.9, temperature: float = 4.0, standardize: bool = False):
        non_negative("KDTerm", "weight", weight)
        positive("KDTerm", "temperature", temperature)
        super().__init__(weight)
        self.temperature, self.standardize = temperature, standardize

    def forward(
        self, student: StagedOutput, teacher: StagedOutput, target: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        return kd_loss(student.logits, teacher.logits, self.temperature, self.standardize)
