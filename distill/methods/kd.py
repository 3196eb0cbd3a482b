"""Offline distillation: a student learns from a frozen teacher through weighted base losses.

Any combination of the classic terms of METHODS.md §2 (KD, FitNet, AT, SP, RKD, PKT, CRD, DKD) is
one list in the config; the total loss is ``ce_weight · CE + Σ weight_i(epoch) · term_i``. PWKD, SOKD's
feature extension and KR build on this module.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from .. import checks
from ..losses.term import DistillTerm
from ..models import create_model
from .base import MAIN, DistillModule
from .teacher import TeacherMixin, build_teacher


def unique_names(terms: list[DistillTerm]) -> list[str]:
    """Log names of the terms; a name used twice gets a numeric suffix (``kd``, ``kd_1``)."""
    seen: Counter = Counter()
    names = []
    for term in terms:
        names.append(term.name if seen[term.name] == 0 else f"{term.name}_{seen[term.name]}")
        seen[term.name] += 1
    return names


class OfflineKD(TeacherMixin, DistillModule):
    """Student + frozen teacher + weighted base losses.

    Args:
        student: zoo name of the student.
        teacher: zoo name of the teacher.
        teacher_weights: the teacher's checkpoint (a ``Supervised`` run's ``.ckpt`` or a plain
            state_dict). Required for a real experiment; ``None`` only for smoke tests.
        terms: the base losses with their weights (``distill.losses``).
        ce_weight: weight of the student's cross-entropy on labels.
        student_kwargs: extra constructor arguments of the student.
        teacher_kwargs: extra constructor arguments of the teacher.
    """

    eval_names = (MAIN, "teacher")  # the teacher's val top-1 is measured in the first validation

    def __init__(
        self,
        student: str = "resnet8x4",
        teacher: str = "resnet32x4",
        teacher_weights: str | None = None,
        terms: list[DistillTerm] | None = None,
        ce_weight: float = 1.0,
        student_kwargs: dict | None = None,
        teacher_kwargs: dict | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        checks.non_negative(type(self).__name__, "ce_weight", ce_weight)
        self.save_hyperparameters(ignore=["terms"])
        self.ce_weight = ce_weight
        self.student = create_model(
            student, num_classes=self.num_classes, in_chans=self.in_chans, **(student_kwargs or {})
        )
        self.attach_teacher(*self.load_teacher(teacher, teacher_weights, teacher_kwargs))
        self.terms = nn.ModuleList(terms or [])
        self.term_names = unique_names(list(self.terms))
        self.build_terms()

    def load_teacher(self, name: str, weights: str | None, model_kwargs: dict | None):
        """The frozen teacher and the record of where it came from (PWKD loads a slimmable one)."""
        return build_teacher(name, weights, self.num_classes, self.in_chans, model_kwargs)

    def build_terms(self) -> None:
        """Size every term's connectors from a dry run of both networks (eval mode, batch of 2)."""
        probe = torch.zeros(2, self.in_chans, self.image_size, self.image_size)
        was_training = self.student.training
        self.student.eval()
        with torch.no_grad():
            s, t = self.student(probe, features=True), self.teacher(probe, features=True)
        self.student.train(was_training)
        for term in self.terms:
            term.build(s, t)

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule if self.trainer is not None else None
        if stage == "fit" and datamodule is not None and hasattr(datamodule, "train_targets"):
            for term in self.terms:
                term.setup_data(datamodule.train_targets)

    def forward(self, images):
        return self.student(images)

    def eval_logits(self, images):
        return {MAIN: self.student(images), **self.teacher_eval_logits(images)}

    def training_losses(self, images, targets, index):
        s = self.student(images, features=True)
        t = self.teacher_forward(images)
        losses = {"ce": self.ce_weight * F.cross_entropy(s.logits.float(), targets)}
        for name, term in zip(self.term_names, self.terms):
            losses[name] = term.weight_at(self.current_epoch) * term(s, t, targets, index)
        return losses, s.logits
