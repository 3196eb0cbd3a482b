"""The interface between the offline KD engine and a base loss (METHODS.md §2).

A term is a small ``nn.Module`` that reads what it needs from the student's and the teacher's
:class:`~distill.models.staged.StagedOutput` (logits, stage outputs, pre-pool feature, embedding),
owns its connectors (a FitNet regressor, CRD embeddings and memory), and returns its *unweighted*
loss. The engine multiplies by :meth:`weight_at` and logs the term under :attr:`name`.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import checks
from ..models.staged import StagedOutput

TEACHER_FIELDS = frozenset(StagedOutput._fields)


class DistillTerm(nn.Module):
    """Base of every term.

    ``reads_teacher`` names the :class:`StagedOutput` fields the term reads from the teacher; a term
    that reads only ``logits`` can distil from stored teacher logits and from any architecture that
    has no stages. The default is every field (the conservative answer).
    """

    name: str = "term"
    reads_teacher: frozenset[str] = TEACHER_FIELDS

    def __init__(self, weight: float = 1.0):
        super().__init__()
        checks.non_negative(type(self).__name__, "weight", weight)
        self.weight = weight

    def build(self, student: StagedOutput, teacher: StagedOutput) -> None:
        """Size connectors from a dry run (batch of 2, eval mode); called once before training."""

    def setup_data(self, targets: torch.Tensor) -> None:
        """Size per-sample state (e.g. CRD's memory) from the training split's labels (one per
        sample, in dataset-index order); called at fit setup, before a checkpoint is restored."""

    def weight_at(self, epoch: int) -> float:
        """The weight in force at ``epoch`` (0-based); constant unless a method warms it up."""
        return self.weight

    def forward(
        self, student: StagedOutput, teacher: StagedOutput, target: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError
