"""KDSVD: self-supervised knowledge distillation using singular value decomposition (Lee et al., ECCV 2018)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..checks import non_negative, positive
from ..models.staged import StagedOutput
from .maps import paired_last
from .term import DistillTerm


def _finite(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def singular_vectors(feature: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` right singular vectors of the (B, H·W, C) matrix of a (B, C, H, W) map, each
    L2-normalised, as (B, C, n), and its first ``n`` singular values L2-normalised together, (B, n).
    Non-finite entries become 0 (the CRD benchmark's ``removenan``)."""
    _, s, vh = torch.linalg.svd(feature.flatten(2).transpose(1, 2), full_matrices=False)
    v = _finite(vh.transpose(1, 2))[:, :, :n]
    return F.normalize(v, dim=1), F.normalize(_finite(s)[:, :n], dim=1)


def _canonical_signs(v: torch.Tensor) -> torch.Tensor:
    """Each vector (a column of (B, C, k)) flipped so that its largest-magnitude entry is positive."""
    peak = v.gather(1, v.abs().argmax(dim=1, keepdim=True))
    return v * torch.where(peak < 0, -1.0, 1.0)


def _align_signs(v_s: torch.Tensor, v_t: torch.Tensor) -> torch.Tensor:
    """For each teacher vector, the student vector of largest |cosine|, sign-flipped to agree: (B, C, k)."""
    cosine = v_s.transpose(1, 2) @ v_t  # (B, k_s, k_t)
    best = cosine.abs() == cosine.abs().amax(dim=1, keepdim=True)
    return v_s @ torch.where(best, cosine.sign(), torch.zeros_like(cosine))


def _rbf(v: torch.Tensor, v_before: torch.Tensor) -> torch.Tensor:
    """exp(−(v[c] − v_before[c'])² / 8) for every channel pair and singular vector: (B, C, C_before, k)."""
    return torch.exp(-(v.unsqueeze(2) - v_before.unsqueeze(1)).pow(2) / 8)


def check_channels(stages_s: Sequence[torch.Tensor], stages_t: Sequence[torch.Tensor]) -> None:
    """KDSVD relates singular vectors channel by channel: equal channel counts at every paired stage."""
    channels_s, channels_t = [f.shape[1] for f in stages_s], [f.shape[1] for f in stages_t]
    if channels_s != channels_t:
        raise ValueError(
            f"KDSVD needs equal channel counts at every paired stage, got {channels_s} (student) and "
            f"{channels_t} (teacher): pick a same-width pair or another method"
        )


def kdsvd_loss(stages_s: Sequence[torch.Tensor], stages_t: Sequence[torch.Tensor], k: int = 1) -> torch.Tensor:
    """Σ over consecutive stage pairs of ‖RBF_s − RBF_t‖² / B, as the CRD benchmark's ``KDSVD``.

    At every stage the teacher's first ``k`` right singular vectors (channel space) are scaled by its
    normalised singular values; the student's first ``k + 3`` are matched to them by |cosine|
    (sign-aligned) and scaled by the same values. [chosen] The teacher's vectors are sign-normalised
    (largest-magnitude entry positive): the benchmark keeps whatever signs the SVD routine returns,
    on which the loss depends. Between consecutive stages an RBF kernel relates
    every channel pair; non-finite squared differences count as 0. Student and teacher need the
    same channel count at every stage. Float32 (autocast off), teacher detached.
    """
    check_channels(stages_s, stages_t)
    total = stages_s[0].new_zeros((), dtype=torch.float32)
    with torch.autocast(stages_s[0].device.type, enabled=False):
        before = None
        for f_s, f_t in zip(stages_s, stages_t):
            v_t, s_t = singular_vectors(f_t.detach().float(), k)
            v_t = _canonical_signs(v_t)
            v_s, _ = singular_vectors(f_s.float(), k + 3)
            v_s, v_t = _align_signs(v_s, v_t) * s_t.unsqueeze(1), v_t * s_t.unsqueeze(1)
            if before is not None:
                diff = (_rbf(v_s, before[0]) - _rbf(v_t, before[1])).pow(2)
                total = total + _finite(diff).sum()
            before = v_s, v_t
    return total / stages_s[0].shape[0]


class KDSVDTerm(DistillTerm):
    """KDSVD over the paired stage outputs (Lee et al., 2018); the CRD benchmark's weight 1 and k = 1.

    Needs the same channel count in every paired stage (e.g. resnet56→resnet20, resnet32x4→resnet8x4,
    wrn_40_2→wrn_16_2, vgg13→vgg8); other pairs are refused when the term is built.
    """

    name = "kdsvd"
    reads_teacher = frozenset({"stages"})

    def __init__(self, weight: float = 1.0, k: int = 1):
        non_negative("KDSVDTerm", "weight", weight)
        positive("KDSVDTerm", "k", k)
        super().__init__(weight)
        self.k = k

    def build(self, student: StagedOutput, teacher: StagedOutput) -> None:
        check_channels(*paired_last(student.stages, teacher.stages))

    def forward(
        self, student: StagedOutput, teacher: StagedOutput, target: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        return kdsvd_loss(*paired_last(student.stages, teacher.stages), self.k)
