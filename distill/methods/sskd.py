"""SSKD: Stage-by-Stage Knowledge Distillation (Gao, Shen, et al., 2018, "Stage-by-stage knowledge
distillation").

Training is decomposed into phases [paper]: in backbone phase k the student's stage k learns,
without labels, to reproduce the frozen teacher's stage-k output (raw squared error, no attention or Gram
transform) on inputs from the student's own earlier stages; then the backbone is fixed and only the
task head learns from the labels, so no weight balances a task loss against a distillation loss.
Each phase is a stage of the run's :class:`~distill.callbacks.stages.StagePlan` (``--stages.*``),
which owns the epochs of the phases and the LR cycle restarted in each and tells this module the
phase of every epoch (so a resumed run is in the right phase); this module routes the gradients.

The project's readings [chosen] (docs/paradigms/sskd.md#project-choices), each an argument below:

- Stages are the networks' resolution stages; the student's stem belongs to stage 1. Student and
  teacher must have the same number of stages (stage k mimics stage k).
- A 1x1 conv + BN adapter maps the student's stage k to the teacher's channels only where they
  differ; where spatial sizes differ the larger map is average-pooled to the smaller one.
- The squared error is summed over channels and averaged over positions and the batch (the squared
  distance of feature vectors, :func:`mimic_loss`): the element-wise mean gives gradients C times
  smaller, with which no stage got near its target in a phase and the head phase then fitted a
  linear classifier to small, poor features (the efficacy study, README: SSKD ended 13 points
  below the student from scratch on the digits).
- The head phase trains the head: the layers between the last stage and the pooling where a
  network has them (WRN's final BN; ShuffleV2's and MobileNetV2's 1x1 conv + BN: no other phase
  trains them) and the classifier. ``head_trains="classifier"`` is the literal "only the
  classifier" of the paper's abstract (identical for ResNets and VGGs), ``"last_stage_and_head"`` its option.
- The head phase starts from the teacher's head (``head_init``): the backbone phases taught the
  student's last stage to reproduce the teacher's, so the teacher's classifier (through the last
  stage's adapter, folded into it, where there is one) already reads the student's features. From a
  random classifier the head phase's short budget did not converge: on the efficacy study's data
  a linear probe of the frozen backbone reached 79.4 % (mean of 3 seeds) while the head phase ended
  at 54.8 %; started from the teacher's head the same runs end at 75.1 %
  (docs/paradigms/sskd.md#where-the-head-phase-starts).

Freezing (docs/design.md#freezing-under-ddp): frozen parts run without autograd, their BatchNorm is put back in
eval mode by every ``train()`` (and at every epoch start), and their ``.grad`` is cleared before
every optimiser step, since DDP with ``find_unused_parameters`` may hand them zeros: neither
momentum nor weight decay moves them. ``requires_grad`` never changes. Every phase leaves
parameters unused, so multi-GPU runs need ``trainer.strategy: ddp_find_unused_parameters_true``;
plain ``ddp`` is refused at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pytorch_lightning.utilities.rank_zero import rank_zero_info
from torch import nn

from .. import checks
from ..errors import ConfigError
from ..models import StagedNet, create_model, stage_channels
from ..models.staged import Chain, Head
from ..stages import Stage
from .base import MAIN, DistillModule
from .teacher import TeacherMixin, build_teacher

PLANS = ("stage_by_stage", "joint_mimic", "joint_ce")
HEAD_TRAINS = ("classifier", "head", "last_stage_and_head")
MIMIC_REDUCTIONS = ("channel_sum", "mean")
HEAD_INITS = ("auto", "teacher", "random")
HEAD_SHARE = 0.1  # [chosen] share of the epochs that goes to the head phase by default


@dataclass(frozen=True)
class Phase:
    """What one phase trains.

    The student is split into parts ``[stage 1 (with the stem), ..., stage K, final norm, classifier]``.
    Parts ``first..last`` learn; earlier parts run without autograd and later ones do not run.
    ``mimic`` lists the (0-based) stages whose mimic losses are trained, ``ce`` whether labels are used.
    """

    name: str
    first: int
    last: int
    mimic: tuple[int, ...]
    ce: bool


def plan_phases(plan: str, num_stages: int, head_trains: str, freeze_earlier_stages: bool) -> list[Phase]:
    """The phases of a plan: ``stage_by_stage`` (the paper: K backbone phases, then the head),
    ``joint_mimic`` (ablation: all stages mimicked in one phase, then the head) or ``joint_ce``
    (ablation without decomposition: one phase, the whole student on CE + all mimic losses)."""
    k = num_stages
    if plan == "joint_ce":
        return [Phase("joint CE + mimic", 0, k + 1, tuple(range(k)), ce=True)]
    head_first = {"classifier": k + 1, "head": k, "last_stage_and_head": k - 1}[head_trains]
    head = Phase("head", head_first, k + 1, (), ce=True)
    if plan == "joint_mimic":
        return [Phase("all stages", 0, k - 1, tuple(range(k)), ce=False), head]
    return [Phase(f"stage {i + 1}", 0 if not freeze_earlier_stages else i, i, (i,), ce=False) for i in range(k)] + [
        head
    ]


def student_parts(net: StagedNet) -> list[nn.Module]:
    """Views of ``net`` in the order of :class:`Phase` parts (built on demand: SyncBatchNorm swaps modules)."""
    stages = list(net.stages)
    head = net.head
    return [
        Chain(net.stem, stages[0]),
        *stages[1:],
        head.pre,
        head.without_pre(),
    ]


def make_adapter(student_channels: int, teacher_channels: int) -> nn.Module:
    """1x1 conv + BN where the channel counts differ, identity otherwise [chosen]."""
    if student_channels == teacher_channels:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(student_channels, teacher_channels, 1, bias=False), nn.BatchNorm2d(teacher_channels))


def mimic_loss(
    student_feature: torch.Tensor, teacher_feature: torch.Tensor, reduction: str = "channel_sum"
) -> torch.Tensor:
    """Raw squared error between stage outputs, in fp32; the larger map is average-pooled to the smaller size.

    ``reduction="channel_sum"`` [chosen, default]: the squared distance between the two feature
    vectors at a position, ‖s − t‖² summed over channels, averaged over positions and the batch. Each
    feature element then gets the gradient 2(s − t)/(H·W), the scale at which cross-entropy reaches
    it through global average pooling, so the base LR that trains a network on labels also trains a
    stage to mimic. ``"mean"``: the element-wise mean (``F.mse_loss``), whose gradients are C times
    smaller: with it a stage stops far from its target within a phase (see the README's SSKD
    diagnosis).
    """
    s, t = student_feature.float(), teacher_feature.float()
    size = (min(s.shape[-2], t.shape[-2]), min(s.shape[-1], t.shape[-1]))
    if s.shape[-2:] != size:
        s = F.adaptive_avg_pool2d(s, size)
    if t.shape[-2:] != size:
        t = F.adaptive_avg_pool2d(t, size)
    if reduction == "mean":
        return F.mse_loss(s, t)
    return (s - t).square().sum(1).mean()


def fold_adapter(classifier: nn.Linear, adapter: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight, bias)`` of one linear layer equal to ``classifier`` after global pooling of ``adapter``'s output.

    The adapter (identity, or a 1x1 conv + BN read in eval mode) is affine per position, so it commutes
    with average pooling: W_t · (scale ⊙ (M s) + shift) + b_t = (W_t · diag(scale) · M) s + (W_t · shift + b_t).
    """
    weight, bias = classifier.weight.detach(), classifier.bias.detach()
    if isinstance(adapter, nn.Identity):
        return weight.clone(), bias.clone()
    conv, bn = adapter
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias.detach() - bn.running_mean * scale
    mixing = scale[:, None] * conv.weight.detach().flatten(1)  # (teacher channels, student channels)
    return weight @ mixing, bias + weight @ shift


def teacher_head_state(
    student: StagedNet, teacher: StagedNet, adapter: nn.Module, trains_pre: bool
) -> tuple[dict[str, torch.Tensor] | None, str]:
    """The state of the student's head that starts the head phase at the teacher's head [chosen], and
    what it is made of; ``(None, why not)`` where the teacher's head cannot read the student's last stage.

    Heads without a final norm (ResNets, VGGs): the teacher's classifier, folded through the last
    stage's adapter (:func:`fold_adapter`). Heads with one (WRN, ShuffleV2, MobileNetV2): the
    teacher's final norm and classifier, copied, where no adapter stands between the stages, the
    heads have the same shapes and the head phase trains the final norm."""
    s_head, t_head = student.head, teacher.head
    if type(s_head) is not Head or type(t_head) is not Head:
        return None, "the networks' heads are not the zoo's plain pooling + classifier heads"
    s_cls, t_cls = s_head.classifier, t_head.classifier
    if not (isinstance(s_cls, nn.Linear) and isinstance(t_cls, nn.Linear)) or s_cls.bias is None or t_cls.bias is None:
        return None, "the classifiers are not linear layers with a bias"
    s_pre, t_pre = s_head.pre.state_dict(), t_head.pre.state_dict()
    if not s_pre and not t_pre and type(s_head.pre) is type(t_head.pre):
        weight, bias = fold_adapter(t_cls, adapter)
        via = "" if isinstance(adapter, nn.Identity) else " folded through the last stage's adapter"
        return {"classifier.weight": weight, "classifier.bias": bias}, f"the teacher's classifier{via}"
    if not isinstance(adapter, nn.Identity):
        return None, "an adapter stands between the last stages; the teacher's final norm cannot be folded through it"
    if not trains_pre:
        return (
            None,
            "head_trains=classifier leaves the student's final norm untrained; the teacher's classifier reads its own",
        )
    state = {f"pre.{k}": v for k, v in t_pre.items()} | {f"classifier.{k}": v for k, v in t_cls.state_dict().items()}
    if type(s_head.pre) is not type(t_head.pre) or {k: v.shape for k, v in state.items()} != {
        k: v.shape for k, v in s_head.state_dict().items()
    }:
        return None, "the final norms differ in structure or shape"
    return {k: v.detach().clone() for k, v in state.items()}, "the teacher's final norm and classifier"


class SSKD(TeacherMixin, DistillModule):
    """Stage-by-stage distillation of ``student`` from a frozen ``teacher``, one stage of the plan per phase.

    Args:
        student: zoo name of the student.
        teacher: zoo name of the teacher (same number of resolution stages as the student).
        teacher_weights: the teacher's checkpoint; ``None`` only for smoke tests.
        plan: ``stage_by_stage`` (the paper), ``joint_mimic`` or ``joint_ce`` (ablations, see
            :func:`plan_phases`).
        head_trains: what the head phase trains [chosen: ``head`` = final norm + classifier]:
            ``classifier``, ``head`` or ``last_stage_and_head``.
        freeze_earlier_stages: in backbone phase k, keep stages < k frozen (the paper; ``False`` is
            the project's alternative reading: they learn from stage k's mimic loss too).
        mimic_weight: weight of every mimic loss (1: the raw squared error). Only the ``joint_ce``
            ablation needs another value, where it balances the cross-entropy.
        mimic_reduction: ``channel_sum`` [chosen]: squared feature distance per position (summed over
            channels), averaged over positions and batch; ``mean``: the element-wise mean (C times
            weaker gradients; the project's reading before the efficacy study). See :func:`mimic_loss`.
        head_init: where the head phase starts [chosen]: ``teacher`` (the teacher's head, see
            :func:`teacher_head_state`; refused where it cannot read the student), ``random`` (the
            student's own initialisation: the literal reading) or ``auto`` (``teacher`` where it can, else
            ``random``, and the log says which and why).
        student_kwargs: extra constructor arguments of the student.
        teacher_kwargs: extra constructor arguments of the teacher.
    """

    eval_names = (MAIN, "teacher")  # the student's val/top1 is not meaningful before the head phase

    def __init__(
        self,
        student: str = "resnet20",
        teacher: str = "resnet56",
        teacher_weights: str | None = None,
        plan: Literal["stage_by_stage", "joint_mimic", "joint_ce"] = "stage_by_stage",
        head_trains: Literal["classifier", "head", "last_stage_and_head"] = "head",
        freeze_earlier_stages: bool = True,
        mimic_weight: float = 1.0,
        mimic_reduction: Literal["channel_sum", "mean"] = "channel_sum",
        head_init: Literal["auto", "teacher", "random"] = "auto",
        student_kwargs: dict | None = None,
        teacher_kwargs: dict | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.save_hyperparameters()
        checks.choice("SSKD", "plan", plan, PLANS)
        checks.choice("SSKD", "head_trains", head_trains, HEAD_TRAINS)
        checks.choice("SSKD", "mimic_reduction", mimic_reduction, MIMIC_REDUCTIONS)
        checks.choice("SSKD", "head_init", head_init, HEAD_INITS)
        checks.non_negative("SSKD", "mimic_weight", mimic_weight)
        self.mimic_weight, self.mimic_reduction = mimic_weight, mimic_reduction
        self.student = create_model(
            student, num_classes=self.num_classes, in_chans=self.in_chans, **(student_kwargs or {})
        )
        student_parts(self.student)  # refuses, now, a student that cannot run stage by stage
        self.attach_teacher(*build_teacher(teacher, teacher_weights, self.num_classes, self.in_chans, teacher_kwargs))
        s_channels = stage_channels(self.student, self.in_chans, self.image_size)
        t_channels = stage_channels(self.teacher, self.in_chans, self.image_size)
        if len(s_channels) != len(t_channels):
            raise ConfigError(
                f"SSKD matches student stage k with teacher stage k, but student {student} has "
                f"{len(s_channels)} stages and teacher {teacher} has {len(t_channels)}"
            )
        self.adapters = nn.ModuleList(make_adapter(s, t) for s, t in zip(s_channels, t_channels))
        self.phases = plan_phases(plan, len(s_channels), head_trains, freeze_earlier_stages)
        self.own_head_reason = self.check_head_init(head_init)

    def check_head_init(self, head_init: str) -> str | None:
        """Why the head phase starts from the student's own classifier; ``None``: from the teacher's head
        (or there is no head phase). ``head_init=teacher`` where the teacher's head cannot be used is refused."""
        if not self.has_head_phase:
            return None
        if head_init == "random":
            return "head_init=random"
        state, how = teacher_head_state(self.student, self.teacher, self.adapters[-1], self.head_trains_pre)
        if state is not None:
            return None
        if head_init == "teacher":
            raise ConfigError(
                f"SSKD head_init=teacher: the teacher's head cannot start the student's ({how}); "
                "set model.init_args.head_init to random or auto"
            )
        return how

    @property
    def has_head_phase(self) -> bool:
        """Whether the plan ends in a head phase (not ``joint_ce``)."""
        return len(self.phases) > 1 and not self.phases[-1].mimic

    @property
    def head_trains_pre(self) -> bool:
        """Whether the head phase trains the head's final norm (the part after the last stage)."""
        return self.phases[-1].first <= len(self.adapters)

    def start_head_phase(self) -> str:
        """Set the student's head where the head phase starts; what it starts from, for the log."""
        if self.own_head_reason is not None:
            return f"from the student's own classifier ({self.own_head_reason})"
        state, how = teacher_head_state(self.student, self.teacher, self.adapters[-1], self.head_trains_pre)
        self.student.head.load_state_dict(state)
        return f"from {how}"

    # ---- phases (the stages of the StagePlan callback) ----------------------------------------
    def stages(self) -> list[Stage]:
        """One stage per phase, each with its own cosine cycle ([chosen]; ``--stages.lr step`` is the
        step-schedule ablation). [chosen] Unless ``--stages.epochs`` says otherwise, the head phase (the
        last of two or more) gets ``HEAD_SHARE`` of the epochs, at least one, and the phases before it
        an equal split of the rest (CIFAR ResNets: 72/72/72/24 of 240). Why not an equal split: the
        head phase fits a linear classifier to frozen features, which takes a few epochs, while a
        stage's mimic loss is still falling at the end of an equal share; on the digits the equal
        split left SSKD below the student from scratch (README: the efficacy study)."""
        last = len(self.phases) - 1
        share = HEAD_SHARE if last else None
        return [
            Stage(p.name, lr="cyclic", share=share if i == last else None, spec=p) for i, p in enumerate(self.phases)
        ]

    def phase_names(self) -> str:
        return ", ".join(p.name for p in self.phases)

    @property
    def phase_index(self) -> int:
        """0-based index of the current phase; the last one (the trained student) outside a fit."""
        return len(self.phases) - 1 if self.stage_index is None else self.stage_index

    @property
    def phase(self) -> Phase:
        return self.phases[self.phase_index]

    def on_stage(self, index: int, stage: Stage) -> None:
        """Enter the phase of this epoch: announce it at its start (or on resume), re-apply train/eval modes;
        at the head phase's first epoch (not on a resume inside it), set where the head starts."""
        entering = index != self.entered_stage
        super().on_stage(index, stage)
        if not entering:
            return
        start, end = self.stage_bounds[index], self.stage_bounds[index + 1]
        at_start = self.current_epoch == start
        resumed = "" if at_start else f", resumed at epoch {self.current_epoch}"
        head_starts = at_start and self.has_head_phase and index == len(self.phases) - 1
        starts = "; it starts " + self.start_head_phase() if head_starts else ""
        rank_zero_info(f"{self.describe_phase()} (epochs {start}-{end - 1}{resumed}){starts}")

    @property
    def selects_best(self) -> bool:
        """[chosen] Only epochs of a phase that trains the classifier may be the best: before it, the
        student's val/top1 comes from an untrained head."""
        return self.phase.ce

    def describe_phase(self) -> str:
        """One line for the log: what the current phase trains, on what, and whether val/top1 means anything."""
        index, phase = self.phase_index, self.phase
        names = [f"stage {k + 1}" for k in range(len(self.adapters))] + ["final norm", "classifier"]
        names[0] += " (with the stem)"
        has_norm = any(True for _ in self.student.head.pre.parameters())
        trained = [n for i, n in enumerate(names) if phase.first <= i <= phase.last and (has_norm or n != "final norm")]
        text = f"SSKD phase {index + 1}/{len(self.phases)} ({phase.name}): trains the student's {', '.join(trained)}"
        if phase.mimic:
            text += " to mimic teacher stage " + ", ".join(str(k + 1) for k in phase.mimic)
        if phase.ce:
            text += (" and " if phase.mimic else " ") + "on the labels"
        else:
            text += "; val/top1 uses an untrained head and is not meaningful before the head phase"
        return text

    def trained_modules(self, phase: Phase) -> list[nn.Module]:
        parts = student_parts(self.student)
        return parts[phase.first : phase.last + 1] + [self.adapters[k] for k in phase.mimic]

    def frozen_modules(self) -> list[nn.Module]:
        """What the current phase does not train (run without autograd, BatchNorm in eval mode)."""
        if self.stage_index is None:
            return []
        phase, parts = self.phase, student_parts(self.student)
        return (
            parts[: phase.first]
            + parts[phase.last + 1 :]
            + [a for k, a in enumerate(self.adapters) if k not in phase.mimic]
        )

    def trained_parameters(self) -> list[nn.Parameter] | None:
        if self.stage_index is None:
            return None
        return [p for module in self.trained_modules(self.phase) for p in module.parameters()]

    # ---- Lightning hooks -----------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.stage_bounds is None:
            raise ConfigError(
                "SSKD needs the distill.callbacks.StagePlan callback in trainer.callbacks (the distill CLI adds it)"
            )

    @property
    def leaves_parameters_unused(self) -> bool:
        """Every phase trains part of the student only."""
        return True

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self.trainer.sanity_checking or self.stage_index is None:
            return
        index = self.phase_index
        metric = self.metrics["val_main"]["top1"]
        if self.current_epoch == self.stage_bounds[index + 1] - 1 and metric.update_count:
            suffix = "" if self.phase.ce else "_untrained_head"
            self.log(f"val/top1_end_of_phase{index + 1}{suffix}", metric.compute())

    # ---- steps ---------------------------------------------------------------------------------
    def forward(self, images):
        return self.student(images)

    def eval_logits(self, images):
        return {MAIN: self.student(images), **self.teacher_eval_logits(images)}

    def run_student(self, images: torch.Tensor, phase: Phase) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Stage outputs up to ``phase.last`` and the logits when the classifier runs; parts before
        ``phase.first`` run without autograd."""
        parts = student_parts(self.student)
        num_stages = len(self.adapters)
        x, stages = images, []
        for i, part in enumerate(parts[: phase.last + 1]):
            with torch.set_grad_enabled(i >= phase.first and torch.is_grad_enabled()):
                x = part(x)
            if i < num_stages:
                stages.append(x)
        return stages, x if phase.last == len(parts) - 1 else None

    def mimic_losses(self, images: torch.Tensor, stages: list[torch.Tensor], phase: Phase) -> dict[str, torch.Tensor]:
        """``mimic_stage<k>`` (1-based) for every mimicked stage: squared error of A_k(f_s^k) and f_t^k, weighted."""
        if not phase.mimic:
            return {}
        with torch.no_grad():
            teacher = self.teacher.forward_stages(images, upto=max(phase.mimic) + 1)
        return {
            f"mimic_stage{k + 1}": self.mimic_weight
            * mimic_loss(self.adapters[k](stages[k]), teacher[k], self.mimic_reduction)
            for k in phase.mimic
        }

    def training_losses(self, images, targets, index):
        """Mimic losses of the phase; cross-entropy where the phase uses labels (head, joint_ce).
        Backbone phases compute no logits, hence no train accuracy."""
        phase = self.phase
        stages, logits = self.run_student(images, phase)
        losses = self.mimic_losses(images, stages, phase)
        if phase.ce:
            losses["ce"] = F.cross_entropy(logits.float(), targets)
        return losses, logits
