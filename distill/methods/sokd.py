"""SOKD: Semi-Online Knowledge Distillation (Liu, Liu, Huang, BMVC 2021); docs/paradigms/sokd.md.

A frozen pre-trained teacher, a student trained from scratch, and a trainable knowledge bridge
module (KBM): a fresh copy of the teacher's last stage + final norm + classifier, fed with the
detached output of the teacher's second-to-last stage. With p_X = softmax(z_X / τ), every KL × τ²
and every partner prediction detached (as in the official code):

    L_KBM = CE(z_A, y) + KL(p_T ‖ p_A) + KL(p_S ‖ p_A)        L_S = CE(z_S, y) + KL(p_A ‖ p_S)

summed into one loss, one SGD over two parameter groups (student, KBM). The "improved teacher" is
the teacher up to the bridge followed by the KBM; :mod:`distill.tools.improved_teacher` exports it.

Faithful to the official code: the teacher runs in train mode by default (``teacher_bn="train"``),
so its BatchNorm normalises with batch statistics and updates its running averages. Those buffers
then change during training, so they are saved in the checkpoint (``distill_sokd``) and restored on
resume. The teacher stays unregistered (docs/design.md#the-frozen-teacher), so DDP neither
broadcasts its buffers nor does ``sync_batchnorm`` convert it: its forward normalises with each
rank's own batch, and [chosen] its floating-point buffers are averaged over the ranks after every
training step, so the ranks agree (for the running means this equals the statistics of the global
batch).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .. import checks
from ..errors import ConfigError
from ..losses.kd import kd_loss
from ..losses.term import DistillTerm
from ..models import StagedNet, StagedOutput, create_model, read_state_dict
from ..models.staged import dry_run, evaluating, preact_bn_of
from ..models.weights import WeightLoadError, file_sha256, load_checkpoint
from .base import MAIN
from .card import Network
from .kd import OfflineKD, prepare_term_outputs, unique_names

KBM_STATE_PREFIX = "kbm.net."  # + a teacher state_dict key = the KBM's key in the method's state_dict
KBM_LOSSES = ("kbm_ce", "kbm_kl_teacher", "kbm_kl_student")  # the rest of the loss terms train the student


def sokd_losses(
    student_logits: torch.Tensor,
    kbm_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 4.0,
    ce_weight: float = 1.0,
    kl_weight: float = 1.0,
    kbm_ce_weight: float = 1.0,
    kbm_teacher_kl_weight: float = 1.0,
    kbm_student_kl_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """The five weighted terms of §5; ``kd_loss(z, z_partner)`` = τ²·KL(p_partner ‖ p_z), partner detached."""
    return {
        "ce": ce_weight * F.cross_entropy(student_logits.float(), targets),
        "kl": kl_weight * kd_loss(student_logits, kbm_logits, temperature),
        "kbm_ce": kbm_ce_weight * F.cross_entropy(kbm_logits.float(), targets),
        "kbm_kl_teacher": kbm_teacher_kl_weight * kd_loss(kbm_logits, teacher_logits, temperature),
        "kbm_kl_student": kbm_student_kl_weight * kd_loss(kbm_logits, student_logits, temperature),
    }


def _tensor_ids(module: nn.Module) -> set[int]:
    return {id(t) for t in (*module.parameters(), *module.buffers())}


def _prune_to(module: nn.Module, keep: set[int]) -> None:
    """Replace every child holding none of the ``keep`` tensors by a parameter-free identity."""
    for name, child in list(module.named_children()):
        held = _tensor_ids(child)
        if held and not held & keep:
            setattr(module, name, nn.Identity())
        elif held - keep:
            _prune_to(child, keep)


class KnowledgeBridge(nn.Module):
    """The KBM: a network of the teacher's architecture cut to ``stages[first_stage:]`` + head.

    ``net`` keeps the teacher's module tree with everything before ``first_stage`` replaced by
    parameter-free identities, so ``net.state_dict()`` uses the teacher's own key names for the
    bridged part (``block3.…``, ``bn1.…``, ``fc.…``) and the staged views still work. The views are
    rebuilt at every call, so a SyncBatchNorm conversion of ``net`` reaches them.
    """

    def __init__(self, net: StagedNet, first_stage: int):
        super().__init__()
        bridged = [*list(net.stages)[first_stage:], net.head]
        names = {id(module): name for name, module in net.named_modules()}
        # the BatchNorms behind the bridged stages' pre-activations, by name (looked up at every call)
        self.preact_norm_names = (
            [None if bn is None else names[id(bn)] for bn in net.preact_norms()[first_stage:]]
            if net.defines_preacts
            else []
        )
        keep = set().union(*(_tensor_ids(part) for part in bridged))
        _prune_to(net, keep)
        if _tensor_ids(net) != keep:
            raise ConfigError(
                f"{type(net).__name__}: stages {first_stage}.. and the head share modules with the earlier stages"
            )
        self.net, self.first_stage = net, first_stage

    @property
    def gives_preacts(self) -> bool:
        """Whether the bridged stages' pre-activations can be computed stage by stage: not for an
        architecture with its own pre-activation pass (WRN's live in the next stage's first BatchNorm)."""
        return self.net.defines_preacts and type(self.net).forward_preacts is StagedNet.forward_preacts

    def forward(self, x: torch.Tensor) -> StagedOutput:
        """The bridged stages and the head; their pre-activations too where ``net`` keeps them."""
        outputs, preacts = [], []
        keep = self.net.preacts_kept
        for index in range(self.first_stage, len(self.net.stages)):
            if keep:
                x, pre = self.net.stage_preact(index, x)
                preacts.append(pre)
            else:
                x = self.net.stages[index](x)
            outputs.append(x)
        head = self.net.head
        feature, embedding = head.features(x)
        logits = head.classifier(embedding)
        if not keep:
            return StagedOutput(logits, tuple(outputs), feature, embedding)
        norms = tuple(
            None if name is None else preact_bn_of(self.net.get_submodule(name)) for name in self.preact_norm_names
        )
        return StagedOutput(logits, tuple(outputs), feature, embedding, tuple(preacts), norms)


def feature_target(teacher: StagedOutput, kbm: StagedOutput, first_stage: int) -> StagedOutput:
    """[chosen] The feature extension's target: the teacher's stages before the bridge, then the
    KBM's stages, pre-pool feature, embedding and logits, all detached (the KBM acts as the teacher)."""
    preacts = preact_bn = None
    if teacher.preacts is not None and kbm.preacts is not None:  # OFD, ReviewKD
        preacts = tuple(teacher.preacts[:first_stage]) + tuple(x.detach() for x in kbm.preacts)
        bridged = tuple(None if bn is None else (bn[0].detach(), bn[1].detach()) for bn in kbm.preact_bn)
        preact_bn = tuple(teacher.preact_bn[:first_stage]) + bridged
    return StagedOutput(
        kbm.logits.detach(),
        tuple(teacher.stages[:first_stage]) + tuple(x.detach() for x in kbm.stages),
        kbm.feature.detach(),
        kbm.embedding.detach(),
        preacts,
        preact_bn,
    )


def improved_teacher_state_dict(
    checkpoint: str | Path, teacher_weights: str | Path | None = None
) -> dict[str, torch.Tensor]:
    """The improved teacher of a SOKD checkpoint: the frozen teacher up to the bridge followed by the trained
    KBM, as a state_dict of the teacher architecture. The teacher's weights are re-read from the file the
    run recorded (SHA-256 checked; ``teacher_weights`` overrides the path), with its BatchNorm buffers as
    the checkpoint saved them when the run used ``teacher_bn=train``, and the KBM's weights in place of
    the teacher's last stages and head."""
    ckpt = load_checkpoint(checkpoint)
    record, teacher = ckpt.get("distill_sokd"), ckpt.get("distill_teacher")
    if record is None or teacher is None:
        raise WeightLoadError(f"{checkpoint}: not a SOKD checkpoint (no 'distill_sokd' record)")
    weights = teacher_weights or teacher["weights"]
    if weights is None:
        raise WeightLoadError(f"{checkpoint}: the run had no teacher_weights, so there is no teacher to export")
    if file_sha256(weights) != teacher["sha256"]:
        raise WeightLoadError(
            f"{weights} is not the teacher {checkpoint} was trained with (sha256 {teacher['sha256']})"
        )
    state = read_state_dict(weights)
    state.update(record["teacher_buffers"] or {})
    state.update(
        {k[len(KBM_STATE_PREFIX) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(KBM_STATE_PREFIX)}
    )
    model = create_model(
        teacher["arch"], num_classes=record["num_classes"], in_chans=record["in_chans"], **record["teacher_kwargs"]
    )
    model.load_state_dict(state)  # strict: the export is exactly the teacher architecture
    return model.state_dict()


class SOKD(OfflineKD):
    """Semi-online distillation through a knowledge bridge module.

    Args:
        student, teacher, teacher_weights, student_kwargs, teacher_kwargs: as in :class:`OfflineKD`.
        terms: optional feature terms (FitNet, AT, …). [chosen] Their target is the KBM: the teacher's
            stages before the bridge, then the KBM's stages, feature and embedding (feature-based
            extension, docs/paradigms/sokd.md#feature-extension; the official code has none).
        ce_weight: weight of the student's CE(z_S, y).
        kl_weight: weight of the student's τ²·KL(p_A ‖ p_S).
        kbm_ce_weight: weight of the KBM's CE(z_A, y).
        kbm_teacher_kl_weight: weight of the KBM's τ²·KL(p_T ‖ p_A).
        kbm_student_kl_weight: weight of the KBM's τ²·KL(p_S ‖ p_A).
        temperature: τ of every KL (4 in the official code).
        teacher_bn: ``train`` (official code: the frozen teacher's BatchNorm uses batch statistics
            and updates its running averages) or ``eval`` (running statistics, teacher unchanged).
        kbm_init: ``random`` (official code: a fresh instance of the teacher architecture, with its
            own initialisation) or ``copy`` (the pre-trained teacher's last stage + head).
        bridge_stage: the first teacher stage the KBM copies (negative counts from the end); the KBM
            reads the detached output of the stage before it. Default -1: the last stage.
        kbm_lr: the KBM group's base LR; ``None`` = ``lr`` (official recipe: 0.1 for both).
    """

    eval_names = (MAIN, "kbm", "teacher")  # student, improved teacher, teacher: every validation
    exported = {
        **OfflineKD.exported,
        "teacher-improved": Network(KBM_STATE_PREFIX, "teacher", "teacher_kwargs", improved_teacher_state_dict),
    }

    def __init__(
        self,
        student: str = "wrn_40_1",
        teacher: str = "wrn_40_2",
        teacher_weights: str | None = None,
        terms: list[DistillTerm] | None = None,
        ce_weight: float = 1.0,
        kl_weight: float = 1.0,
        kbm_ce_weight: float = 1.0,
        kbm_teacher_kl_weight: float = 1.0,
        kbm_student_kl_weight: float = 1.0,
        temperature: float = 4.0,
        teacher_bn: Literal["train", "eval"] = "train",
        kbm_init: Literal["random", "copy"] = "random",
        bridge_stage: int = -1,
        kbm_lr: float | None = None,
        student_kwargs: dict | None = None,
        teacher_kwargs: dict | None = None,
        **kwargs,
    ):
        checks.choice("SOKD", "teacher_bn", teacher_bn, ("train", "eval"))
        checks.choice("SOKD", "kbm_init", kbm_init, ("random", "copy"))
        checks.positive("SOKD", "temperature", temperature)
        for key, weight in (
            ("kl_weight", kl_weight),
            ("kbm_ce_weight", kbm_ce_weight),
            ("kbm_teacher_kl_weight", kbm_teacher_kl_weight),
            ("kbm_student_kl_weight", kbm_student_kl_weight),
        ):
            checks.non_negative("SOKD", key, weight)
        if kbm_lr is not None:
            checks.positive("SOKD", "kbm_lr", kbm_lr)
        # The terms are built below, once the KBM exists: its output is their feature target.
        super().__init__(
            student=student,
            teacher=teacher,
            teacher_weights=teacher_weights,
            terms=None,
            ce_weight=ce_weight,
            student_kwargs=student_kwargs,
            teacher_kwargs=teacher_kwargs,
            **kwargs,
        )
        self.loss_weights = dict(
            ce_weight=ce_weight,
            kl_weight=kl_weight,
            kbm_ce_weight=kbm_ce_weight,
            kbm_teacher_kl_weight=kbm_teacher_kl_weight,
            kbm_student_kl_weight=kbm_student_kl_weight,
        )
        self.temperature, self.teacher_bn, self.kbm_lr = temperature, teacher_bn, kbm_lr
        self.teacher_train_mode = teacher_bn == "train"
        self.teacher_kwargs = dict(teacher_kwargs or {})
        n = len(self.teacher.stages)
        if not -n < bridge_stage < n or bridge_stage % n == 0:
            raise ConfigError(
                f"bridge_stage must name one of the stages 1..{n - 1} (or -{n - 1}..-1) of the teacher "
                f"{teacher!r}, which has {n} stages; got {bridge_stage}"
            )
        self.first_stage = bridge_stage % n
        if kbm_init == "copy":
            net = copy.deepcopy(self.teacher).requires_grad_(True)
        else:
            net = create_model(teacher, num_classes=self.num_classes, in_chans=self.in_chans, **self.teacher_kwargs)
        self.kbm = KnowledgeBridge(net, self.first_stage).train()
        self.terms = nn.ModuleList(terms or [])
        self.term_names = unique_names(list(self.terms))
        self.build_terms()

    def build_terms(self) -> None:
        """Size the terms' connectors from a dry run (eval mode, batch of 2) against the KBM target."""
        if not len(self.terms):
            return
        for name, term in zip(self.term_names, self.terms):
            if term.init_epochs:
                raise ConfigError(
                    f"SOKD terms: {name!r} ({type(term).__name__}) has an initialisation phase, which SOKD does not "
                    "run (its feature target, the KBM, trains with the student from the first step); use the term "
                    "with OfflineKD, PWKD or KR"
                )
            if prepare_term_outputs(term, self.student, self.teacher):
                if not self.kbm.gives_preacts:
                    raise ConfigError(
                        f"SOKD terms: {name!r} ({type(term).__name__}) reads pre-activations, which the KBM of a "
                        f"{type(self.kbm.net).__name__} teacher cannot give stage by stage; use a term without "
                        "pre-activations or a ResNet-style teacher"
                    )
                self.kbm.net.keep_preacts()
        s = dry_run(self.student, self.in_chans, self.image_size)
        t = dry_run(self.teacher, self.in_chans, self.image_size)
        with evaluating(self.kbm):
            target = feature_target(t, self.kbm(t.stages[self.first_stage - 1]), self.first_stage)
        for term in self.terms:
            term.build(s, target)

    def param_groups(self) -> list[dict]:
        """Two groups: the student (with any term connectors) and the KBM (LR ``kbm_lr``)."""
        kbm = list(self.kbm.parameters())
        kbm_ids = {id(p) for p in kbm}
        kbm_group = {"params": kbm}
        if self.kbm_lr is not None:
            kbm_group["lr"] = self.kbm_lr * self.base_lr() / self.lr
        return [{"params": [p for p in self.parameters() if p.requires_grad and id(p) not in kbm_ids]}, kbm_group]

    def main_losses(self, images, targets, index):
        s = self.student(images, features=True)
        t = self.teacher_forward(images)  # no grad; batch statistics when teacher_bn="train"
        a = self.kbm(t.stages[self.first_stage - 1].detach())
        losses = sokd_losses(s.logits, a.logits, t.logits, targets, self.temperature, **self.loss_weights)
        if len(self.terms):
            target = feature_target(t, a, self.first_stage)
            for name, term in zip(self.term_names, self.terms):
                losses[name] = term.weight_at(self.current_epoch) * term(s, target, targets, index)
        return losses, s.logits

    def eval_logits(self, images):
        with torch.no_grad():
            t = self.teacher(images, features=True)
            kbm = self.kbm(t.stages[self.first_stage - 1]).logits
        return {MAIN: self.student(images), "kbm": kbm, "teacher": t.logits}

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        if self.teacher_bn == "train" and self.trainer.world_size > 1:
            self._average_teacher_buffers()

    @torch.no_grad()
    def _average_teacher_buffers(self) -> None:
        buffers = [b for b in self.teacher.buffers() if b.is_floating_point()]
        flat = self.trainer.strategy.reduce(torch.cat([b.flatten() for b in buffers]), reduce_op="mean")
        for buffer, value in zip(buffers, flat.split([b.numel() for b in buffers])):
            buffer.copy_(value.view_as(buffer))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        buffers = {k: v.detach().cpu().clone() for k, v in self.teacher.named_buffers()}
        checkpoint["distill_sokd"] = {
            "num_classes": self.num_classes,
            "in_chans": self.in_chans,
            "teacher_kwargs": self.teacher_kwargs,
            "teacher_bn": self.teacher_bn,
            "teacher_buffers": buffers if self.teacher_bn == "train" else None,  # eval: the file's, unchanged
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = (checkpoint.get("distill_sokd") or {}).get("teacher_buffers")
        if saved is None:
            return
        own = dict(self.teacher.named_buffers())
        if own.keys() != saved.keys():
            raise RuntimeError(f"the checkpoint's teacher buffers do not fit the teacher {self.teacher_info['arch']!r}")
        with torch.no_grad():
            for name, buffer in own.items():
                buffer.copy_(saved[name])
