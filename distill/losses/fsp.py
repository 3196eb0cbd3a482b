"""FSP: flow of solution procedure (Yim et al., CVPR 2017, "A Gift from Knowledge Distillation").

FSP is used only in an initialisation phase: :class:`FSPTerm` trains the student's stem and stages
on the FSP loss for ``init_epochs`` (the CRD benchmark: 30), after which the main training is CE
alone (the benchmark adds no FSP loss after the phase).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import checks
from ..errors import ConfigError
from ..models.staged import StagedOutput
from .maps import pool_to_smaller
from .term import DistillTerm


def fsp_matrix(bottom: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """G[b, j, i] = mean over positions of top[b, j] · bottom[b, i]: the (B, C_top, C_bottom) flow
    between two maps, the larger one first adaptive-average-pooled to the other's size."""
    bottom, top = pool_to_smaller(bottom, top)
    return torch.bmm(top.flatten(2), bottom.flatten(2).transpose(1, 2)) / bottom[0, 0].numel()


def fsp_loss(stages_s: Sequence[torch.Tensor], stages_t: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ over consecutive pairs (k, k + 1) of mean((G_s − G_t)²) of the FSP matrices.

    As the CRD benchmark's ``FSP`` (which feeds it the stem output and every stage output): student
    and teacher need the same channel counts at every map. Float32 (autocast off), teacher detached.
    """
    if len(stages_s) != len(stages_t) or len(stages_s) < 2:
        raise ValueError(
            f"FSP needs as many student as teacher maps (at least 2), got {len(stages_s)} and {len(stages_t)}"
        )
    channels_s, channels_t = [f.shape[1] for f in stages_s], [f.shape[1] for f in stages_t]
    if channels_s != channels_t:
        raise ValueError(f"FSP needs equal channel counts, got {channels_s} (student) and {channels_t} (teacher)")
    with torch.autocast(stages_s[0].device.type, enabled=False):
        s = [f.float() for f in stages_s]
        t = [f.detach().float() for f in stages_t]
        return sum((fsp_matrix(s[k], s[k + 1]) - fsp_matrix(t[k], t[k + 1])).pow(2).mean() for k in range(len(s) - 1))


class FSPTerm(DistillTerm):
    """FSP's initialisation phase (see the module docstring): the student's stage outputs against the
    teacher's. [chosen] The flows run between consecutive *stage* outputs only: the benchmark also
    pairs the stem output with the first stage, which the staged interface does not expose.

    Args:
        weight: weight of the FSP loss in its phase (the benchmark sums it unweighted: 1).
        init_epochs: length of the phase (the benchmark's ``init_epochs``, 30).
    """

    name = "fsp"
    reads_teacher = frozenset({"stages"})
    init_trains_student = True
    used_after_init = False

    def __init__(self, weight: float = 1.0, init_epochs: int = 30):
        super().__init__(weight)
        checks.positive_int("FSPTerm", "init_epochs", init_epochs)
        self.init_epochs = init_epochs

    def build(self, student: StagedOutput, teacher: StagedOutput) -> None:
        channels_s, channels_t = [f.shape[1] for f in student.stages], [f.shape[1] for f in teacher.stages]
        if channels_s != channels_t or len(channels_s) < 2:
            raise ConfigError(
                f"FSPTerm needs student and teacher stages of equal channel counts (at least two stages), got "
                f"{channels_s} (student) and {channels_t} (teacher): pick a pair of equal widths (resnet32x4 -> "
                "resnet8x4, wrn_40_2 -> wrn_16_2)"
            )

    def init_loss(self, student: StagedOutput | None, teacher: StagedOutput) -> torch.Tensor:
        return self.weight * fsp_loss(student.stages, teacher.stages)
