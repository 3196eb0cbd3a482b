"""AT: activation-based attention transfer (Zagoruyko & Komodakis, 2017)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .. import checks
from ..models.staged import StagedOutput
from .term import DistillTerm


def attention_map(f: torch.Tensor, p: float = 2) -> torch.Tensor:
    """a(f) = L2-normalise(mean over channels of f^p), flattened to (B, H·W)."""
    return F.normalize(f.pow(p).mean(1).flatten(1), dim=1)


def at_loss(f_s: torch.Tensor, f_t: torch.Tensor, p: float = 2) -> torch.Tensor:
    """mean((a(f_s) − a(f_t))²) for one stage pair; the larger map is first adaptive-average-pooled
    to the smaller one's size. Float32, teacher detached."""
    f_s, f_t = f_s.float(), f_t.detach().float()
    size = tuple(min(s, t) for s, t in zip(f_s.shape[-2:], f_t.shape[-2:]))
    if f_s.shape[-2:] != size:
        f_s = F.adaptive_avg_pool2d(f_s, size)
    if f_t.shape[-2:] != size:
        f_t = F.adaptive_avg_pool2d(f_t, size)
    return (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()


def at_loss_stages(fs: Sequence[torch.Tensor], ft: Sequence[torch.Tensor], p: float = 2) -> torch.Tensor:
    """Sum of :func:`at_loss` over paired stage outputs (``zip`` order)."""
    if len(fs) != len(ft) or not fs:
        raise ValueError(f"AT needs as many student as teacher stage outputs, got {len(fs)} and {len(ft)}")
    return sum(at_loss(s, t, p) for s, t in zip(fs, ft))


class ATTerm(DistillTerm):
    """Attention transfer summed over the stage outputs (Zagoruyko & Komodakis, 2017).

    Stages pair up in order; [chosen] when the networks have different stage counts, the last
    min(n_s, n_t) stages of each are paired (the deepest stages carry the most task-specific maps).
    """

    name = "at"
    reads_teacher = frozenset({"stages"})

    def __init__(self, weight: float = 1000.0, p: float = 2.0):
        super().__init__(weight)
        checks.positive("ATTerm", "p", p)
        self.p = p

    def forward(
        self, student: StagedOutput, teacher: StagedOutput, target: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        n = min(len(student.stages), len(teacher.stages))
        return at_loss_stages(student.stages[-n:], teacher.stages[-n:], self.p)
