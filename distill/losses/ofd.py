"""OFD: a comprehensive overhaul of feature distillation (Heo et al., ICCV 2019).

The student's pre-ReLU stage outputs, through a 1x1 conv + BN connector each, regress the teacher's
pre-ReLU outputs with a partial L2 distance: where the teacher is negative (the ReLU would zero
it) the student is only pushed below a per-channel margin, the expected negative response.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import non_negative
from ..models.staged import StagedOutput
from .maps import paired_last
from .term import DistillTerm


def ofd_margin(bn_weight: torch.Tensor, bn_bias: torch.Tensor) -> torch.Tensor:
    """Per channel, E[x | x < 0] for x ~ N(β, |γ|²), the distribution a BatchNorm (γ, β) outputs on
    normalised input: β − |γ| · φ(β/|γ|) / Φ(−β/|γ|), or −3|γ| where Φ(−β/|γ|) ≤ 0.001 (the official
    ``get_margin_from_BN``). No gradient; float32."""
    std, mean = bn_weight.detach().float().abs(), bn_bias.detach().float()
    ratio = mean / std
    below = torch.special.ndtr(-ratio)
    expected = mean - std * torch.exp(-(ratio**2) / 2) / math.sqrt(2 * math.pi) / below
    return torch.where(below > 0.001, expected, -3 * std)


def ofd_loss(
    feats_s: Sequence[torch.Tensor], feats_t: Sequence[torch.Tensor], margins: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Σ_i 2^−(n−1−i) · Σ_{c,h,w} d(s, max(t, m_c)) / B over the n stage pairs (deepest weighted 1).

    ``feats_s``: the student's connector outputs; ``feats_t``: the teacher's pre-ReLU maps, each
    adaptive-average-pooled to the student's size (as mdistiller); ``margins``: (C_t,) per stage.
    d is the partial L2 of the official code: (s − t')² where s > t' or t' > 0, 0 elsewhere, with
    t' = max(t, margin). Float32 (autocast off), teacher detached.
    """
    n = len(feats_s)
    total = feats_s[0].new_zeros((), dtype=torch.float32)
    with torch.autocast(feats_s[0].device.type, enabled=False):
        for i, (s, t, m) in enumerate(zip(feats_s, feats_t, margins)):
            s = s.float()
            t = F.adaptive_avg_pool2d(t.detach().float(), s.shape[-2:])
            t = torch.maximum(t, m.float().view(1, -1, 1, 1))
            mask = (s > t) | (t > 0)
            total = total + ((s - t).pow(2) * mask).sum() / 2 ** (n - 1 - i)
    return total / feats_s[0].shape[0]


class OFDConnector(nn.Sequential):
    """1x1 conv (no bias, He-normal with fan-out) + BatchNorm (γ 1, β 0), student → teacher channels."""

    def __init__(self, s_channels: int, t_channels: int):
        conv = nn.Conv2d(s_channels, t_channels, 1, bias=False)
        nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / t_channels))
        super().__init__(conv, nn.BatchNorm2d(t_channels))


class OFDTerm(DistillTerm):
    """Overhaul of feature distillation on the paired stages' pre-activations (Heo et al., 2019).

    Defaults: mdistiller's CIFAR-100 weight 1e-3 (the official code divides by 1000). It reads both
    networks' pre-activations (the offline engine makes them keep them); the margin of every teacher
    stage comes from the BatchNorm that
    produces its pre-activation (:attr:`StagedOutput.preact_bn`), recomputed from the teacher's
    parameters at every step. Architectures without such a BatchNorm (ShuffleV2) cannot be the teacher.
    """

    name = "ofd"
    reads_teacher = frozenset({"preacts", "preact_bn"})
    reads_student = frozenset({"preacts"})

    def __init__(self, weight: float = 1e-3):
        non_negative("OFDTerm", "weight", weight)
        super().__init__(weight)
        self.connectors: nn.ModuleList | None = None

    def build(self, student: StagedOutput, teacher: StagedOutput) -> None:
        for side, out in (("student", student), ("teacher", teacher)):
            if out.preacts is None:
                raise ValueError(
                    f"OFDTerm reads pre-activations, which the {side} does not return: call keep_preacts() on it "
                    "(the offline engine does)"
                )
        s, t = paired_last(student.preacts, teacher.preacts)
        _, norms = paired_last(student.preacts, teacher.preact_bn)
        for i, (f, bn) in enumerate(zip(t, norms)):
            if bn is None or bn[0].shape != (f.shape[1],):
                stage = len(teacher.preacts) - len(t) + i
                found = "none" if bn is None else f"one of {bn[0].numel()} channels"
                raise ValueError(
                    f"OFDTerm takes its margin from the BatchNorm before the teacher's pre-activation; for the "
                    f"teacher's stage {stage} ({f.shape[1]} channels) there is {found}: choose another teacher"
                )
        device = student.logits.device
        self.connectors = nn.ModuleList(OFDConnector(a.shape[1], b.shape[1]) for a, b in zip(s, t)).to(device)

    def forward(
        self, student: StagedOutput, teacher: StagedOutput, target: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        s, t = paired_last(student.preacts, teacher.preacts)
        _, norms = paired_last(student.preacts, teacher.preact_bn)
        feats_s = [connector(f) for connector, f in zip(self.connectors, s)]
        return ofd_loss(feats_s, t, [ofd_margin(*bn) for bn in norms])
