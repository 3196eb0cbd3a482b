"""DKD: decoupled knowledge distillation (Zhao et al., 2022).

KD splits into target-class KD (TCKD: the binary "target vs the rest" distributions) and
non-target-class KD (NCKD: the distributions over the non-target classes, renormalised);
KD = TCKD + (1 − p_t^T) · NCKD. DKD weights the two freely: α · TCKD + β · NCKD. Optional logit
standardisation (Sun et al., 2024) z-scores both logit vectors first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import non_negative, non_negative_int, positive
from ..models.staged import StagedOutput
from .kd import standardize_logits
from .term import DistillTerm


def _binary_log_probs(logits: torch.Tensor, gt_mask: torch.Tensor) -> torch.Tensor:
    """log [p_target, p_rest] per row, computed with logsumexp (no log of a sum of probabilities)."""
    log_z = torch.logsumexp(logits, dim=1, keepdim=True)
    log_target = logits[gt_mask].unsqueeze(1)
    log_rest = torch.logsumexp(logits.masked_fill(gt_mask, float("-inf")), dim=1, keepdim=True)
    return torch.cat([log_target, log_rest], dim=1) - log_z


def _non_target(logits: torch.Tensor, gt_mask: torch.Tensor) -> torch.Tensor:
    """The (B, C − 1) logits of the non-target classes (exact removal, no large-negative masking)."""
    return logits[~gt_mask].view(logits.shape[0], -1)


def linear_warmup(weight: float, epoch: int, warmup: int) -> float:
    """``weight`` · min((epoch + 1) / warmup, 1): the official min(epoch / warmup, 1) ramp of DKD and
    ReviewKD (mdistiller), with epochs counted from 1 there and from 0 here; no ramp when ``warmup`` is 0."""
    return weight * min((epoch + 1) / warmup, 1.0) if warmup > 0 else weight


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    standardize: bool = False,
) -> torch.Tensor:
    """α · TCKD + β · NCKD, each a τ²-scaled KL(teacher ‖ student) averaged over the batch.

    Same definition as the official code (mdistiller); with ``standardize`` the logits are z-scored
    before the temperature (:func:`~distill.losses.kd.standardize_logits`). Computed in float32 in
    log space, teacher detached.
    """
    z_s, z_t = student_logits.float(), teacher_logits.detach().float()
    if standardize:
        z_s, z_t = standardize_logits(z_s), standardize_logits(z_t)
    z_s, z_t = z_s / temperature, z_t / temperature
    gt_mask = F.one_hot(target, z_s.shape[1]).bool()
    tckd = F.kl_div(
        _binary_log_probs(z_s, gt_mask), _binary_log_probs(z_t, gt_mask), reduction="batchmean", log_target=True
    )
    log_q_s = F.log_softmax(_non_target(z_s, gt_mask), dim=1)
    log_q_t = F.log_softmax(_non_target(z_t, gt_mask), dim=1)
    nckd = F.kl_div(log_q_s, log_q_t, reduction="batchmean", log_target=True)
    return (alpha * tckd + beta * nckd) * temperature**2


class DKDTerm(DistillTerm):
    """Decoupled KD (Zhao et al., 2022), weight warmed up linearly over ``warmup`` epochs.

    The official code scales by min(epoch / warmup, 1) with epochs counted from 1; with the
    engine's 0-based epochs that is min((epoch + 1) / warmup, 1). ``standardize``: logit
    standardisation (``methods/dkd_ls.yaml``: τ = 2, weight 9, the official defaults, which scale
    α and β by 9).
    """

    name = "dkd"
    reads_teacher = frozenset({"logits"})

    def __init__(
        self,
        weight: float = 1.0,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        warmup: int = 20,
        standardize: bool = False,
    ):
        for key, value in (("weight", weight), ("alpha", alpha), ("beta", beta)):
            non_negative("DKDTerm", key, value)
        positive("DKDTerm", "temperature", temperature)
        non_negative_int("DKDTerm", "warmup", warmup)
        super().__init__(weight)
        self.alpha, self.beta, self.temperature, self.warmup = alpha, beta, temperature, warmup
        self.standardize = standardize

    def weight_at(self, epoch: int) -> float:
        return linear_warmup(self.weight, epoch, self.warmup)

    def forward(
        self, student: StagedOutput, teacher: StagedOutput, target: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        return dkd_loss(
            student.logits, teacher.logits, target, self.alpha, self.beta, self.temperature, self.standardize
        )
