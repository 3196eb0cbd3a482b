"""The interface between the offline KD engine and a base loss (docs/design.md#losses-and-terms).

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

TEACHER_FIELDS = frozenset(StagedOutput._fields) - {"preacts", "preact_bn"}


class DistillTerm(nn.Module):
    """Base of every term.

    ``reads_teacher`` names the :class:`StagedOutput` fields the term reads from the teacher; a term
    that reads only ``logits`` can distil from stored teacher logits and from any architecture that
    has no stages. The default is every field but the pre-activations (the conservative answer).
    ``reads_student`` names those it reads from the student (``None``: the same). The engine refuses a
    network that cannot give a field a term reads, and asks for the pre-activations where one does.

    A term with an initialisation phase (AB, FT, FSP in the CRD benchmark) sets ``init_epochs``: the
    offline engine then runs one stage of that many epochs before its own, at a constant LR, that
    trains only :meth:`init_modules` (and the student's stem and stages where ``init_trains_student``)
    on :meth:`init_loss`. After it, ``used_after_init`` says whether the term's loss joins the main
    training, and :meth:`frozen_after_init` what stays fixed.
    """

    name: str = "term"
    reads_teacher: frozenset[str] = TEACHER_FIELDS
    reads_student: frozenset[str] | None = None
    init_epochs: int = 0
    init_trains_student: bool = False
    used_after_init: bool = True

    def __init__(self, weight: float = 1.0):
        super().__init__()
        checks.non_negative(type(self).__name__, "weight", weight)
        self.weight = weight

    def build(self, student: StagedOutput, teacher: StagedOutput) -> None:
        """Size connectors from a dry run (batch of 2, eval mode); called once before training."""

    def setup_data(self, targets: torch.Tensor) -> None:
        """Size per-sample state (e.g. CRD's memory) from the training split's labels (one per
        sample, in dataset-index order); called at fit setup, before a checkpoint is restored."""

    @property
    def student_fields(self) -> frozenset[str]:
        """The fields read from the student."""
        return self.reads_teacher if self.reads_student is None else self.reads_student

    def weight_at(self, epoch: int) -> float:
        """The weight in force at ``epoch`` (0-based); constant unless a method warms it up."""
        return self.weight

    def forward(
        self, student: StagedOutput, teacher: StagedOutput, target: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError

    # ---- the initialisation phase (terms with init_epochs > 0) ------------------------------------
    def init_loss(self, student: StagedOutput | None, teacher: StagedOutput) -> torch.Tensor:
        """The loss of the initialisation phase; ``student`` is ``None`` unless ``init_trains_student``."""
        raise NotImplementedError(f"{type(self).__name__} sets init_epochs but defines no init_loss")

    def init_modules(self) -> list[nn.Module]:
        """The term's modules trained in its initialisation phase (by default all of it)."""
        return [self]

    def frozen_after_init(self) -> list[nn.Module]:
        """The term's modules that stay fixed after the initialisation phase (FT's paraphraser)."""
        return []
