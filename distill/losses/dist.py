"""DIST: knowledge distillation from a stronger teacher (Huang et al., NeurIPS 2022).

The student matches the teacher's *relations* rather than its exact probabilities: Pearson
correlation between the two softmax outputs across classes for each sample (inter-class relation)
and across the batch for each class (intra-class relation).
"""

from __future__ import annotations

import torch

from ..checks import non_negative, positive
from ..models.staged import StagedOutput
from .kd import standardize_logits
from .term import DistillTerm


def _mean_pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean over rows of the Pearson correlation of ``a[i]`` and ``b[i]`` (eps in the denominator, as
    the official ``pearson_correlation``)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return ((a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)).mean()


def dist_loss(
    logits_s: torch.Tensor,
    logits_t: torch.Tensor,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
    standardize: bool = False,
) -> torch.Tensor:
    """τ² · (β · (1 − inter-class relation) + γ · (1 − intra-class relation)) of p = softmax(z / τ).

    Inter: mean over samples of the correlation across classes; intra: mean over classes of the
    correlation across the batch (the official ``DIST`` loss, defaults β = γ = τ = 1). With
    ``standardize`` the logits are z-scored first (logit standardisation, Sun et al., 2024).
    Float32 (autocast off), teacher detached.
    """
    with torch.autocast(logits_s.device.type, enabled=False):
        z_s, z_t = logits_s.float(), logits_t.detach().float()
        if standardize:
            z_s, z_t = standardize_logits(z_s), standardize_logits(z_t)
        p_s, p_t = (z_s / temperature).softmax(dim=1), (z_t / temperature).softmax(dim=1)
        inter = 1 - _mean_pearson(p_s, p_t)
        intra = 1 - _mean_pearson(p_s.t(), p_t.t())
        return temperature**2 * (beta * inter + gamma * intra)


class DISTTerm(DistillTerm):
    """DIST on the logits (Huang et al., 2022).

    Defaults: the official CIFAR-100 recipe (``dist_cifar.yaml`` of the authors' code: ``dist_t4``,
    i.e. β = γ = 1, τ = 4, loss weight 2, CE 1). The authors' ImageNet recipe and the loss's own
    defaults use τ = 1 (set ``temperature: 1``). ``standardize``: logit standardisation
    (``methods/dist_ls.yaml``).
    """

    name = "dist"
    reads_teacher = frozenset({"logits"})

    def __init__(
        self,
        weight: float = 2.0,
        beta: float = 1.0,
        gamma: float = 1.0,
        temperature: float = 4.0,
        standardize: bool = False,
    ):
        for key, value in (("weight", weight), ("beta", beta), ("gamma", gamma)):
            non_negative("DISTTerm", key, value)
        positive("DISTTerm", "temperature", temperature)
        super().__init__(weight)
        self.beta, self.gamma, self.temperature, self.standardize = beta, gamma, temperature, standardize

    def forward(
        self, student: StagedOutput, teacher: StagedOutput, target: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        return dist_loss(student.logits, teacher.logits, self.beta, self.gamma, self.temperature, self.standardize)
