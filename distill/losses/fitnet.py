"""FitNet: hint-based feature regression (Romero et al., 2015, FitNets)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..models.staged import StagedOutput
from .term import DistillTerm


def fitnet_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """MSE between the regressed student hint ``f_s`` and the teacher hint ``f_t`` (float32, teacher detached)."""
    return F.mse_loss(f_s.float(), f_t.detach().float())


class ConvRegressor(nn.Module):
    """Maps the student hint (C_s, H_s, W_s) onto the teacher hint's shape (C_t, H_t, W_t).

    conv → BN → ReLU, as the CRD benchmark's regressor (RepDistiller ``ConvReg``): a stride-2 3×3
    conv when the student map is twice as large, a stride-2 transposed 4×4 conv when it is half as
    large, otherwise a valid conv with kernel 1 + H_s − H_t (1×1 at equal size). [chosen] Any other
    upsampling ratio: a 1×1 conv followed by bilinear resizing. ``relu=False`` drops the final ReLU
    (useful when the teacher's hint is a pre-activation).
    """

    def __init__(self, s_shape: tuple[int, int, int], t_shape: tuple[int, int, int], relu: bool = True):
        super().__init__()
        (s_c, s_h, s_w), (t_c, t_h, t_w) = s_shape, t_shape
        self.size = None
        if (s_h, s_w) == (2 * t_h, 2 * t_w):
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif (2 * s_h, 2 * s_w) == (t_h, t_w):
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h and s_w >= t_w:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=1)
            self.size = (t_h, t_w)
        self.bn = nn.BatchNorm2d(t_c)
        self.relu = nn.ReLU(inplace=True) if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.size is not None:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return self.relu(self.bn(x))


def _middle(stages: Sequence[torch.Tensor], stage: int | None) -> int:
    return len(stages) // 2 if stage is None else stage


class FitNetTerm(DistillTerm):
    """FitNet hint regression (Romero et al., 2015, FitNets).

    The hint is a stage output, by default the middle stage (index ``len(stages) // 2``) of each
    network; a :class:`ConvRegressor` maps the student's hint to the teacher's shape.
    """

    name = "fitnet"
    reads_teacher = frozenset({"stages"})

    def __init__(
        self,
        weight: float = 100.0,
        student_stage: int | None = None,
        teacher_stage: int | None = None,
        relu: bool = True,
    ):
        super().__init__(weight)
        self.student_stage, self.teacher_stage, self.relu = student_stage, teacher_stage, relu
        self.regressor: nn.Module | None = None

    def build(self, student: StagedOutput, teacher: StagedOutput) -> None:
        f_s = student.stages[_middle(student.stages, self.student_stage)]
        f_t = teacher.stages[_middle(teacher.stages, self.teacher_stage)]
        self.regressor = ConvRegressor(tuple(f_s.shape[1:]), tuple(f_t.shape[1:]), self.relu).to(f_s.device)

    def forward(
        self, student: StagedOutput, teacher: StagedOutput, target: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        f_s = student.stages[_middle(student.stages, self.student_stage)]
        f_t = teacher.stages[_middle(teacher.stages, self.teacher_stage)]
        return fitnet_loss(self.regressor(f_s), f_t)
