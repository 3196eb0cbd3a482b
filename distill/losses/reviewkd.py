"""ReviewKD: distilling knowledge via knowledge review (Chen et al., CVPR 2021).

The student's stage outputs, deepest first, are fused by attention-based fusion (ABF) modules into a
residual chain, so each output it is compared with carries the deeper stages' information; the
hierarchical context loss (HCL) compares them with the teacher's pre-ReLU stage outputs at several
pyramid levels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import non_negative, positive
from ..models.staged import StagedOutput
from .dkd import linear_warmup
from .maps import paired_last
from .term import DistillTerm


def hcl_loss(features_s: Sequence[torch.Tensor], features_t: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ over pairs of the hierarchical context loss (the official ``hcl``).

    Per pair of equally sized maps: MSE at full resolution (weight 1), plus the MSE after adaptive
    average pooling to 4×4, 2×2 and 1×1 (only levels smaller than the map's height), with weights
    halving from 1/2; the weighted sum is divided by the sum of the weights. Float32 (autocast off),
    teacher detached.
    """
    total = features_s[0].new_zeros((), dtype=torch.float32)
    with torch.autocast(features_s[0].device.type, enabled=False):
        for f_s, f_t in zip(features_s, features_t):
            f_s, f_t = f_s.float(), f_t.detach().float()
            loss, weight, weights = F.mse_loss(f_s, f_t), 1.0, 1.0
            for level in (4, 2, 1):
                if level >= f_s.shape[2]:
                    continue
                weight /= 2
                loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(f_s, level), F.adaptive_avg_pool2d(f_t, level))
                weights += weight
            total = total + loss / weights
    return total


class ABF(nn.Module):
    """Attention-based fusion (the official ``ABF``).

    1x1 conv + BN to ``mid_channels``; when ``fuse``, the residual from the deeper ABF is resized
    (nearest) to this map and mixed in with two per-pixel sigmoid attention maps computed from both;
    the result is resized (nearest) to the teacher map's size ``out_size`` and a 3x3 conv + BN makes
    the output. Returns (output, the fused map passed on as the next residual).
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels)
        )
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, out_size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.conv1(x)
        if self.att_conv is not None:
            residual = F.interpolate(residual, x.shape[-2:], mode="nearest")
            attention = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * attention[:, 0:1] + residual * attention[:, 1:2]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, out_size, mode="nearest")
        return self.conv2(x), x


def review_inputs(out: StagedOutput, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The maps ReviewKD reads from one network: ``maps`` (stage outputs or pre-activations), then the
    pooled embedding as a 1×1 map."""
    return [*maps, out.embedding[:, :, None, None]]


class ReviewKDTerm(DistillTerm):
    """Knowledge review (Chen et al., 2021): ABF fusion of the student's stages + HCL.

    As the official CIFAR code: the student contributes its stage outputs and pooled embedding, the
    teacher its pre-ReLU stage outputs and pooled embedding (the offline engine makes the teacher keep
    its pre-activations); the
    deepest min(n_s, n_t) of each are paired. ABF widths: the middle width is min(512, the student's
    embedding width), each output has the teacher map's channels. Weight 1 (the official default;
    its scripts use 5 for resnet32x4→resnet8x4, wrn_40_2→wrn_16_2/wrn_40_1 and →ShuffleV1, 8 for
    →ShuffleV2, 0.6 for resnet56→resnet20), warmed up linearly over ``warmup`` epochs (20).
    """

    name = "reviewkd"
    reads_teacher = frozenset({"preacts", "embedding"})
    reads_student = frozenset({"stages", "embedding"})

    def __init__(self, weight: float = 1.0, warmup: int = 20, max_mid_channels: int = 512):
        non_negative("ReviewKDTerm", "weight", weight)
        non_negative("ReviewKDTerm", "warmup", warmup)
        positive("ReviewKDTerm", "max_mid_channels", max_mid_channels)
        super().__init__(weight)
        self.warmup, self.max_mid_channels = warmup, max_mid_channels
        self.abfs: nn.ModuleList | None = None

    def _pairs(self, student: StagedOutput, teacher: StagedOutput) -> tuple[list, list]:
        return paired_last(review_inputs(student, student.stages), review_inputs(teacher, teacher.preacts))

    def build(self, student: StagedOutput, teacher: StagedOutput) -> None:
        if teacher.preacts is None:
            raise ValueError(
                "ReviewKDTerm compares with the teacher's pre-activations, which it does not return: call "
                "keep_preacts() on it (the offline engine does)"
            )
        s, t = self._pairs(student, teacher)
        mid = min(self.max_mid_channels, s[-1].shape[1])
        # deepest first: the ABF of the pooled embedding fuses nothing, every shallower one fuses
        self.abfs = nn.ModuleList(
            ABF(a.shape[1], mid, b.shape[1], fuse=i > 0) for i, (a, b) in enumerate(zip(s[::-1], t[::-1]))
        ).to(student.logits.device)

    def weight_at(self, epoch: int) -> float:
        return linear_warmup(self.weight, epoch, self.warmup)

    def forward(
        self, student: StagedOutput, teacher: StagedOutput, target: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        s, t = self._pairs(student, teacher)
        outputs, residual = [], None
        for abf, f_s, f_t in zip(self.abfs, s[::-1], t[::-1]):
            out, residual = abf(f_s, residual, f_t.shape[-2:])
            outputs.append(out)
        return hcl_loss(outputs[::-1], t)
