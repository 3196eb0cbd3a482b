"""Offline distillation: a student learns from a frozen teacher through weighted base losses.

Any combination of the classic terms of METHODS.md §2 (KD, FitNet, AT, SP, RKD, PKT, CRD, DKD) is
one list in the config; the total loss is ``ce_weight · CE + Σ weight_i(epoch) · term_i``. PWKD, SOKD's
feature extension and KR build on this module.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..data.teacher_cache import TeacherCache, describe_run
from ..losses.term import TEACHER_FIELDS, DistillTerm
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


def step_reads_teacher(method: type) -> frozenset[str]:
    """The teacher outputs ``method.training_losses`` reads besides its terms, as declared
    (``training_reads_teacher``) by the class that defines that ``training_losses``; a class that
    overrides it without declaring reads every field (the conservative answer, as for terms)."""
    owner = next(cls for cls in method.__mro__ if "training_losses" in vars(cls))
    return vars(owner).get("training_reads_teacher", TEACHER_FIELDS)


def teacher_cache_refusals(method: type, terms: Iterable[tuple[str, DistillTerm | type]]) -> list[str]:
    """Why stored teacher logits cannot stand in for the teacher in ``method``'s training steps with
    these ``(name, term)`` terms (an empty list: they can)."""
    reasons = []
    step = step_reads_teacher(method) - {"logits"}
    if step:
        reasons.append(f"{method.__name__}'s training step reads the teacher's {', '.join(sorted(step))}")
    for name, term in terms:
        extra = term.reads_teacher - {"logits"}
        if extra:
            cls = term if isinstance(term, type) else type(term)
            reasons.append(f"term {name!r} ({cls.__name__}) reads the teacher's {', '.join(sorted(extra))}")
    return reasons


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
        teacher_cache: a store of ``distill cache-teacher`` written for this run's batches: the training
            steps read the teacher's logits from it instead of running the teacher (validation still
            runs it). Only for terms and methods that read nothing but the teacher's logits; the store's
            fingerprint must match the run's (:mod:`distill.data.teacher_cache`).
    """

    eval_names = (MAIN, "teacher")  # the teacher's val top-1 is measured in the first validation
    training_reads_teacher = frozenset()  # beside its terms, training_losses reads no teacher output

    def __init__(
        self,
        student: str = "resnet8x4",
        teacher: str = "resnet32x4",
        teacher_weights: str | None = None,
        terms: list[DistillTerm] | None = None,
        ce_weight: float = 1.0,
        student_kwargs: dict | None = None,
        teacher_kwargs: dict | None = None,
        teacher_cache: str | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["terms"])
        self.ce_weight = ce_weight
        self.student = create_model(
            student, num_classes=self.num_classes, in_chans=self.in_chans, **(student_kwargs or {})
        )
        self.attach_teacher(*self.load_teacher(teacher, teacher_weights, teacher_kwargs))
        self.terms = nn.ModuleList(terms or [])
        self.term_names = unique_names(list(self.terms))
        self.build_terms()
        self.teacher_cache_path, self.teacher_cache = teacher_cache, None  # the store is opened at fit setup
        refusals = teacher_cache_refusals(type(self), zip(self.term_names, self.terms)) if teacher_cache else []
        if refusals:
            raise ValueError(
                f"teacher_cache={teacher_cache!r} holds teacher logits only, but {'; '.join(refusals)}: "
                "run without model.init_args.teacher_cache"
            )

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
        if stage == "fit" and self.teacher_cache_path:
            self.teacher_cache = TeacherCache(self.teacher_cache_path)
            self.teacher_cache.check(describe_run(self.trainer, datamodule, self)[0])

    def teacher_setting(self):
        """Which teacher network the training steps run, when that changes during a fit (``None``: it
        does not); a teacher cache records it per epoch and checks it at every step."""
        return None

    def forward(self, images):
        return self.student(images)

    def eval_logits(self, images):
        return {MAIN: self.student(images), **self.teacher_eval_logits(images)}

    def training_losses(self, images, targets, index):
        s = self.student(images, features=True)
        if self.teacher_cache is None:
            t = self.teacher_forward(images)
        else:
            t = self.teacher_cache.outputs(self.trainer, index, self.teacher_setting())
        losses = {"ce": self.ce_weight * F.cross_entropy(s.logits.float(), targets)}
        for name, term in zip(self.term_names, self.terms):
            losses[name] = term.weight_at(self.current_epoch) * term(s, t, targets, index)
        return losses, s.logits
