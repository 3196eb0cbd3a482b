"""Offline distillation: a student learns from a frozen teacher through weighted base losses.

Any combination of terms (``distill.losses``: KD, FitNet, AT, SP, RKD, PKT, CRD, DKD, ...) is one
list in the config; the total loss is ``ce_weight · CE + Σ weight_i(epoch) · term_i``. A term with an
initialisation phase (AB, FT, FSP) gets a stage of its own before the main training (see
:class:`~distill.losses.term.DistillTerm`). PWKD, SOKD's feature extension and KR build on this module.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .. import checks
from ..data.teacher_cache import TeacherCache, describe_run
from ..errors import ConfigError
from ..losses.term import TEACHER_FIELDS, DistillTerm
from ..models import StagedNet, create_model
from ..models.staged import dry_run, require_outputs
from ..stages import Stage
from .base import MAIN, DistillModule
from .card import RunCard, term_names
from .teacher import TeacherMixin, build_teacher


@dataclass(frozen=True)
class InitPhase:
    """The spec of an initialisation stage: the index of its term."""

    term: int


def unique_names(terms: list[DistillTerm]) -> list[str]:
    """Log names of the terms; a name used twice gets a numeric suffix (``kd``, ``kd_1``)."""
    seen: Counter = Counter()
    names = []
    for term in terms:
        names.append(term.name if seen[term.name] == 0 else f"{term.name}_{seen[term.name]}")
        seen[term.name] += 1
    return names


def step_reads_teacher(method: type) -> frozenset[str]:
    """The teacher outputs ``method.main_losses`` (the main training step) reads besides its terms, as
    declared (``main_reads_teacher``) by the class that defines that ``main_losses``; a class that
    overrides it without declaring reads every field (the conservative answer, as for terms)."""
    owner = next(cls for cls in method.__mro__ if "main_losses" in vars(cls))
    return vars(owner).get("main_reads_teacher", TEACHER_FIELDS)


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


def prepare_term_outputs(term: DistillTerm, student: StagedNet, teacher: StagedNet) -> bool:
    """Refuse a term that reads an output one of the networks cannot give, and make the networks keep
    their pre-activations where the term reads them; return whether it reads the teacher's."""
    for role, net, fields in (("teacher", teacher, term.reads_teacher), ("student", student, term.student_fields)):
        require_outputs(type(term).__name__, fields, **{role: net})
        if "preacts" in fields:
            net.keep_preacts()
    return "preacts" in term.reads_teacher


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
    main_reads_teacher = frozenset()  # beside its terms, main_losses reads no teacher output

    @classmethod
    def card(cls, args) -> RunCard:
        """Named by its terms alone (``kd``, ``crd+kd``); subclasses keep ``<method>:<terms>``."""
        card = super().card(args)
        return replace(card, column="+".join(term_names(args)) or card.column) if cls is OfflineKD else card

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
        self.teacher_cache_path, self.teacher_cache = teacher_cache, None  # the store is opened at fit setup
        refusals = teacher_cache_refusals(type(self), zip(self.term_names, self.terms)) if teacher_cache else []
        if refusals:
            raise ConfigError(
                f"teacher_cache={teacher_cache!r} holds teacher logits only, but {'; '.join(refusals)}: "
                "run without model.init_args.teacher_cache"
            )

    def load_teacher(self, name: str, weights: str | None, model_kwargs: dict | None):
        """The frozen teacher and the record of where it came from (PWKD loads a slimmable one)."""
        return build_teacher(name, weights, self.num_classes, self.in_chans, model_kwargs)

    def build_terms(self) -> None:
        """Size every term's connectors from a dry run of both networks (eval mode, batch of 2); first refuse
        a term that reads an output a network cannot give, and make the networks keep their pre-activations
        where a term reads them (OFD, ReviewKD)."""
        for term in self.terms:
            prepare_term_outputs(term, self.student, self.teacher)
        s = dry_run(self.student, self.in_chans, self.image_size)
        t = dry_run(self.teacher, self.in_chans, self.image_size)
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

    # ---- stages: the terms' initialisation phases, then the method's own ------------------------
    def stages(self) -> list[Stage]:
        init = [
            Stage(f"{name} init", lr="constant", epochs=term.init_epochs, spec=InitPhase(i))
            for i, (name, term) in enumerate(zip(self.term_names, self.terms))
            if term.init_epochs
        ]
        return init + self.method_stages()

    def method_stages(self) -> list[Stage]:
        """The method's own stages after any initialisation phase: one by default (PWKD: one per width)."""
        return [Stage("main")]

    @property
    def init_phase(self) -> InitPhase | None:
        """The initialisation phase of the current epoch, if it is one."""
        index = self.stage_index
        spec = self.stage_plan[index].spec if index is not None and self.stage_plan else None
        return spec if isinstance(spec, InitPhase) else None

    @property
    def main_epoch(self) -> int:
        """Epochs since the method's own stages began (a term's warm-up counts from there)."""
        first = sum(isinstance(s.spec, InitPhase) for s in self.stage_plan)
        return self.current_epoch - (self.stage_bounds[first] if first else 0)

    @property
    def leaves_parameters_unused(self) -> bool:
        """An initialisation phase trains part of the networks only."""
        return any(term.init_epochs for term in self.terms) or super().leaves_parameters_unused

    @property
    def selects_best(self) -> bool:
        """[chosen] An epoch of an initialisation phase cannot be the best: the classifier is not trained."""
        return self.init_phase is None and super().selects_best

    def frozen_modules(self) -> list[nn.Module]:
        phase = self.init_phase
        if phase is None:
            after = [m for term in self.terms if term.init_epochs for m in term.frozen_after_init()]
            unused = [term for term in self.terms if term.init_epochs and not term.used_after_init]
            return after + unused
        term, trained = self.terms[phase.term], self.terms[phase.term].init_modules()
        student = [self.student.head] if term.init_trains_student else [self.student]
        others = [other for i, other in enumerate(self.terms) if i != phase.term]
        rest = [] if term in trained else [c for c in term.children() if not any(c is m for m in trained)]
        return student + others + rest

    def trained_parameters(self) -> list[nn.Parameter] | None:
        phase = self.init_phase
        if phase is None:
            frozen = {id(p) for module in self.frozen_modules() for p in module.parameters()}
            return [p for p in self.parameters() if id(p) not in frozen] if frozen else None
        term = self.terms[phase.term]
        params = [p for module in term.init_modules() for p in module.parameters()]
        if term.init_trains_student:
            params += [p for part in (self.student.stem, *self.student.stages) for p in part.parameters()]
        return params

    def on_stage(self, index: int, stage: Stage) -> None:
        """Entering the first of the method's own stages after initialisation phases starts a fresh
        optimiser state (the CRD benchmark trains its initialisation with an optimiser of its own)."""
        super().on_stage(index, stage)
        first = sum(isinstance(s.spec, InitPhase) for s in self.stage_plan)
        if first and index == first and self.current_epoch == self.stage_bounds[first] and self._trainer:
            self.optimizers().optimizer.state.clear()

    # ---- steps ---------------------------------------------------------------------------------
    def training_losses(self, images, targets, index):
        phase = self.init_phase
        if phase is not None:
            return self.init_losses(phase, images), None
        return self.main_losses(images, targets, index)

    def init_losses(self, phase: InitPhase, images) -> dict[str, torch.Tensor]:
        """The initialisation phase of one term: its own loss alone, no labels."""
        term = self.terms[phase.term]
        s = self.student(images, features=True) if term.init_trains_student else None
        return {f"{self.term_names[phase.term]}_init": term.init_loss(s, self.teacher_forward(images))}

    def main_losses(self, images, targets, index):
        """CE plus every term used in the main training, each at its weight for this epoch."""
        s = self.student(images, features=True)
        if self.teacher_cache is None:
            t = self.teacher_forward(images)
        else:
            t = self.teacher_cache.outputs(self.trainer, index, self.teacher_setting())
        losses = {"ce": self.ce_weight * F.cross_entropy(s.logits.float(), targets)}
        epoch = self.main_epoch
        for name, term in zip(self.term_names, self.terms):
            if term.used_after_init or not term.init_epochs:
                losses[name] = term.weight_at(epoch) * term(s, t, targets, index)
        return losses, s.logits
