"""The classic base losses of METHODS.md §2 as :class:`DistillTerm` modules for the offline KD engine.

Each term reads what it needs from the two :class:`StagedOutput`, owns its connectors, and returns
its *unweighted* loss; the default ``weight`` is the CRD benchmark's [protocol].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..models.staged import StagedOutput
from .at import at_loss_stages
from .crd import ContrastMemory, Embed
from .dkd import dkd_loss
from .fitnet import ConvRegressor, fitnet_loss
from .kd import kd_loss
from .pkt import pkt_loss
from .rkd import rkd_loss
from .sp import sp_loss
from .term import DistillTerm


class KDTerm(DistillTerm):
    """KD on the logits (Hinton et al., 2015)."""

    name = "kd"

    def __init__(self, weight: float = 0.9, temperature: float = 4.0):
        super().__init__(weight)
        self.temperature = temperature

    def forward(
        self, student: StagedOutput, teacher: StagedOutput, target: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        return kd_loss(student.logits, teacher.logits, self.temperature)


def _middle(stages: Sequence[torch.Tensor], stage: int | None) -> int:
    return len(stages) // 2 if stage is None else stage


class FitNetTerm(DistillTerm):
    """FitNet hint regression (Romero et al., 2015, FitNets).

    The hint is a stage output, by default the middle stage (index ``len(stages) // 2``) of each
    network; a :class:`ConvRegressor` maps the student's hint to the teacher's shape.
    """

    name = "fitnet"

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


class ATTerm(DistillTerm):
    """Attention transfer summed over the stage outputs (Zagoruyko & Komodakis, 2017).

    Stages pair up in order; [chosen] when the networks have different stage counts, the last
    min(n_s, n_t) stages of each are paired (the deepest stages carry the most task-specific maps).
    """

    name = "at"

    def __init__(self, weight: float = 1000.0, p: float = 2.0):
        super().__init__(weight)
        self.p = p

    def forward(
        self, student: StagedOutput, teacher: StagedOutput, target: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        n = min(len(student.stages), len(teacher.stages))
        return at_loss_stages(student.stages[-n:], teacher.stages[-n:], self.p)


class SPTerm(DistillTerm):
    """Similarity preserving on the last-stage feature (Tung & Mori, 2019).

    [chosen] The feature is ``StagedOutput.feature`` (the last stage after the head's final
    norm/activation, before pooling), the map the CRD benchmark uses (its ``feat[-2]``); for
    networks without a final norm it equals the last stage output.
    """

    name = "sp"

    def __init__(self, weight: float = 3000.0):
        super().__init__(weight)

    def forward(
        self, student: StagedOutput, teacher: StagedOutput, target: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        return sp_loss(student.feature, teacher.feature)


class RKDTerm(DistillTerm):
    """Relational KD on the pooled embeddings (Park et al., 2019)."""

    name = "rkd"

    def __init__(self, weight: float = 1.0, distance_weight: float = 25.0, angle_weight: float = 50.0):
        super().__init__(weight)
        self.distance_weight, self.angle_weight = distance_weight, angle_weight

    def forward(
        self, student: StagedOutput, teacher: StagedOutput, target: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        return rkd_loss(student.embedding, teacher.embedding, self.distance_weight, self.angle_weight)


class PKTTerm(DistillTerm):
    """Probabilistic knowledge transfer on the pooled embeddings (Passalis & Tefas, 2018)."""

    name = "pkt"

    def __init__(self, weight: float = 30000.0):
        super().__init__(weight)

    def forward(
        self, student: StagedOutput, teacher: StagedOutput, target: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        return pkt_loss(student.embedding, teacher.embedding)


class CRDTerm(DistillTerm):
    """Contrastive representation distillation on the pooled embeddings (Tian et al., 2020).

    Needs :meth:`setup_data` (the training labels, for the memory and the other-class negatives)
    and the per-sample dataset ``index`` in :meth:`forward`. See :class:`ContrastMemory` for the
    memory's project choices (sampling, DDP, checkpointing).
    """

    name = "crd"

    def __init__(
        self,
        weight: float = 0.8,
        feat_dim: int = 128,
        num_negatives: int = 16384,
        nce_temperature: float = 0.07,
        momentum: float = 0.5,
        seed: int = 0,
    ):
        super().__init__(weight)
        self.feat_dim = feat_dim
        self.embed_s: nn.Module | None = None
        self.embed_t: nn.Module | None = None
        self.memory = ContrastMemory(feat_dim, num_negatives, nce_temperature, momentum, seed)

    def build(self, student: StagedOutput, teacher: StagedOutput) -> None:
        device = student.embedding.device
        self.embed_s = Embed(student.embedding.shape[1], self.feat_dim).to(device)
        self.embed_t = Embed(teacher.embedding.shape[1], self.feat_dim).to(device)

    def setup_data(self, targets: torch.Tensor) -> None:
        self.memory.setup(targets)

    def forward(
        self, student: StagedOutput, teacher: StagedOutput, target: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        return self.memory(self.embed_s(student.embedding), self.embed_t(teacher.embedding.detach()), index)


class DKDTerm(DistillTerm):
    """Decoupled KD (Zhao et al., 2022), weight warmed up linearly over ``warmup`` epochs.

    The official code scales by min(epoch / warmup, 1) with epochs counted from 1; with the
    engine's 0-based epochs that is min((epoch + 1) / warmup, 1).
    """

    name = "dkd"

    def __init__(
        self, weight: float = 1.0, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, warmup: int = 20
    ):
        super().__init__(weight)
        self.alpha, self.beta, self.temperature, self.warmup = alpha, beta, temperature, warmup

    def weight_at(self, epoch: int) -> float:
        return self.weight * min((epoch + 1) / self.warmup, 1.0) if self.warmup > 0 else self.weight

    def forward(
        self, student: StagedOutput, teacher: StagedOutput, target: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        return dkd_loss(student.logits, teacher.logits, target, self.alpha, self.beta, self.temperature)
