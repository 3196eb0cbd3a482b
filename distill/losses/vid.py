"""VID: variational information distillation (Ahn et al., CVPR 2019)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import non_negative, positive
from ..models.staged import StagedOutput
from .maps import paired_last, pool_to_smaller
from .term import DistillTerm


def vid_loss(mean: torch.Tensor, f_t: torch.Tensor, log_scale: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Gaussian negative log-likelihood of the teacher map under the student's prediction, up to the
    constant: mean over every element of ½ · ((μ − t)² / σ² + log σ²), σ² = softplus(log_scale) + eps
    per channel (heteroscedastic over channels, as the authors' code in the CRD benchmark).
    Float32 (autocast off), teacher detached."""
    with torch.autocast(mean.device.type, enabled=False):
        var = (F.softplus(log_scale.float()) + eps).view(1, -1, 1, 1)
        return (0.5 * ((mean.float() - f_t.detach().float()).pow(2) / var + var.log())).mean()


class VIDRegressor(nn.Module):
    """The student side of one VID pair: the mean μ = three 1x1 convs (no bias, ReLU between; the
    middle width is the teacher's channel count) and one log-scale per teacher channel, initialised
    so that σ² = ``init_pred_var``."""

    def __init__(self, s_channels: int, t_channels: int, init_pred_var: float = 5.0, eps: float = 1e-5):
        super().__init__()
        self.mean = nn.Sequential(
            nn.Conv2d(s_channels, t_channels, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(t_channels, t_channels, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(t_channels, t_channels, 1, bias=False),
        )
        # softplus⁻¹(init_pred_var − eps)
        self.log_scale = nn.Parameter(torch.full((t_channels,), math.log(math.expm1(init_pred_var - eps))))
        self.eps = eps

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        """VID loss of one stage pair; the larger map is first pooled to the smaller one's size."""
        f_s, f_t = pool_to_smaller(f_s, f_t)
        return vid_loss(self.mean(f_s), f_t, self.log_scale, self.eps)


class VIDTerm(DistillTerm):
    """VID summed over the paired stage outputs (Ahn et al., 2019), the CRD benchmark's defaults:
    weight 1, initial predicted variance 5, eps 1e-5, one :class:`VIDRegressor` per stage pair."""

    name = "vid"
    reads_teacher = frozenset({"stages"})

    def __init__(self, weight: float = 1.0, init_pred_var: float = 5.0, eps: float = 1e-5):
        non_negative("VIDTerm", "weight", weight)
        positive("VIDTerm", "eps", eps)
        if not isinstance(init_pred_var, (int, float)) or not init_pred_var > eps:
            raise ValueError(f"VIDTerm init_pred_var={init_pred_var!r}: expected a number > eps ({eps})")
        super().__init__(weight)
        self.init_pred_var, self.eps = init_pred_var, eps
        self.regressors: nn.ModuleList | None = None

    def build(self, student: StagedOutput, teacher: StagedOutput) -> None:
        s, t = paired_last(student.stages, teacher.stages)
        self.regressors = nn.ModuleList(
            VIDRegressor(a.shape[1], b.shape[1], self.init_pred_var, self.eps) for a, b in zip(s, t)
        ).to(student.logits.device)

    def forward(
        self, student: StagedOutput, teacher: StagedOutput, target: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        s, t = paired_last(student.stages, teacher.stages)
        return sum(regressor(a, b) for regressor, a, b in zip(self.regressors, s, t))
