"""PWKD — Partial to Whole Knowledge Distillation (Zhang, Zhang, Sun, 2021; METHODS.md §3).

Two modules: :class:`SlimmableSupervised` trains a teacher's weight-sharing widths jointly, and
:class:`PWKD` distills a student from that slimmable teacher stage by stage, narrow (partial) to
whole, over any offline base method. The stages, the teacher width of each and the cyclic LR are
set by the :class:`~distill.callbacks.pwkd.PWKDStages` callback.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pytorch_lightning.strategies import DDPStrategy
from torch import nn

from ..losses.crd import ContrastMemory
from ..models import create_model
from ..models.slimmable import DEFAULT_WIDTHS, check_widths, load_slimmable, make_slimmable, set_width, width_name
from .base import MAIN, DistillModule
from .kd import OfflineKD
from .teacher import build_teacher


def soft_cross_entropy(logits: torch.Tensor, target_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """τ² · cross-entropy of softmax(logits/τ) against softmax(target_logits/τ), batch mean, float32."""
    target = F.softmax(target_logits.float() / temperature, dim=1)
    return -(target * F.log_softmax(logits.float() / temperature, dim=1)).sum(1).mean() * temperature**2


def reject_sync_batchnorm(model: nn.Module) -> None:
    """Per-width BatchNorms do not survive ``sync_batchnorm=True`` (it replaces them with one SyncBatchNorm)."""
    if any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
        raise ValueError(
            "trainer.sync_batchnorm=True is not supported with slimmable networks "
            "(it merges their per-width BatchNorms)"
        )


class SlimmableSupervised(DistillModule):
    """A slimmable network whose widths are trained jointly with cross-entropy (PWKD's teacher).

    Each step runs one forward per width (widest first), sums the per-width losses and takes one
    optimiser step. Every width's top-1 is logged (``val/w0_25_top1`` …); the whole width is the
    main ``val/top1``. The checkpoint records ``train_widths`` (hyper-parameters): PWKD refuses to
    run a teacher at a width it was not trained at.

    Args:
        model: zoo architecture name.
        widths: the widths trained, ending at 1.0 ([chosen] default 0.25, 0.5, 0.75, 1.0).
        sandwich: [chosen] default off. On: the sandwich rule with in-place distillation, the
            whole width learns from the labels and every narrower one from its detached soft output.
        inplace_temperature: [chosen] temperature of the in-place distillation (1).
        init_weights: optional checkpoint to start from: an ordinary one of the same architecture
            (its BatchNorm slices start the narrow widths) or a slimmable one at the same widths.
        train_widths: the widths trained and evaluated (default: all of ``widths``; the widest is
            ``val/top1``). ``[0.25]`` trains the 0.25 sub-network alone, i.e. an ordinary narrow
            network: the separately trained narrow teacher of PWKD's ablation (METHODS.md §3).
        model_kwargs: extra constructor arguments of the architecture.
    """

    def __init__(
        self,
        model: str = "resnet56",
        widths: Sequence[float] = DEFAULT_WIDTHS,
        sandwich: bool = False,
        inplace_temperature: float = 1.0,
        init_weights: str | None = None,
        train_widths: Sequence[float] | None = None,
        model_kwargs: dict | None = None,
        **kwargs,
    ):
        self.widths = check_widths(widths)
        self.train_widths = self.widths if train_widths is None else tuple(sorted({float(w) for w in train_widths}))
        if not self.train_widths or not set(self.train_widths) <= set(self.widths):
            raise ValueError(f"train_widths {list(self.train_widths)} must be some of the widths {list(self.widths)}")
        if sandwich and self.train_widths[-1] != 1.0:
            raise ValueError("sandwich needs the whole width among train_widths (it teaches the narrower ones)")
        self.eval_names = (MAIN,) + tuple(width_name(w) for w in self.train_widths[:-1])  # read by the base's metrics
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.sandwich, self.inplace_temperature = sandwich, inplace_temperature
        self.model = create_model(model, num_classes=self.num_classes, in_chans=self.in_chans, **(model_kwargs or {}))
        if init_weights:
            load_slimmable(self.model, init_weights, self.widths, self.image_size)
        else:
            make_slimmable(self.model, self.widths, self.image_size)

    def forward(self, images):
        return self.model(images)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        reject_sync_batchnorm(self.model)

    def training_losses(self, images, targets, index):
        losses = {}
        widest = self.train_widths[-1]
        for width in reversed(self.train_widths):
            set_width(self.model, width)
            logits = self.model(images)
            if width == widest:
                main = logits
                losses["ce"] = F.cross_entropy(logits.float(), targets)
            elif self.sandwich:
                losses[f"kd_{width_name(width)}"] = soft_cross_entropy(logits, main.detach(), self.inplace_temperature)
            else:
                losses[f"ce_{width_name(width)}"] = F.cross_entropy(logits.float(), targets)
        set_width(self.model, 1.0)
        return losses, main

    def eval_logits(self, images):
        logits = {}
        for width in self.train_widths:
            set_width(self.model, width)
            logits[MAIN if width == self.train_widths[-1] else width_name(width)] = self.model(images)
        set_width(self.model, 1.0)
        return logits


def _prefix(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return tensor[tuple(slice(0, n) for n in shape)]


class SlicedConnector(nn.Module):
    """A connector built for the whole teacher, run at a narrower teacher width on the leading slices
    of its own parameters and buffers, shaped as the connector its term builds for that width.

    ``narrow`` maps a width to that connector (used for its structure only: unregistered, never
    trained); every width shares the whole connector's tensors, so nothing is unused under DDP.
    """

    def __init__(self, whole: nn.Module, narrow: dict[float, nn.Module]):
        super().__init__()
        self.whole = whole
        object.__setattr__(self, "narrow", narrow)
        self.width = 1.0

    def forward(self, *args):
        template = self.narrow.get(self.width)
        if template is None:
            return self.whole(*args)
        template.train(self.training)
        tensors = {**dict(self.whole.named_parameters()), **dict(self.whole.named_buffers())}
        shapes = {**dict(template.named_parameters()), **dict(template.named_buffers())}
        sliced = {name: _prefix(tensors[name], shapes[name].shape) for name in shapes}
        return torch.func.functional_call(template, sliced, args)


class PerStageConnector(nn.Module):
    """One freshly initialised connector per stage; only the active stage's one is used (and trained)."""

    def __init__(self, per_stage: list[nn.Module]):
        super().__init__()
        self.per_stage = nn.ModuleList(per_stage)
        self.stage = 0

    def forward(self, *args):
        return self.per_stage[self.stage](*args)


def trained_widths(path: str, held: Sequence[float]) -> list[float]:
    """The widths the checkpoint at ``path`` was trained at: the ``train_widths`` its ``SlimmableSupervised``
    run recorded among its hyper-parameters, else every width it holds (``held``). Memory-mapped: the
    tensors, already read by the loader, are not read again."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    recorded = (checkpoint.get("hyper_parameters") or {}).get("train_widths") if isinstance(checkpoint, dict) else None
    return sorted(float(w) for w in recorded) if recorded else [float(w) for w in held]


def reset_teacher_memory(memory: ContrastMemory, stage: int) -> None:
    """[chosen] CRD at a stage boundary: the teacher bank restarts from a fresh uniform draw (as at
    the start of training, generator seeded by ``seed + stage``, identical on every rank), and the
    normalisation constants are re-estimated on the stage's first step."""
    memory.reset_teacher(memory.seed + stage)


class PWKD(OfflineKD):
    """Partial-to-whole distillation: the student learns from a slimmable teacher stage by stage.

    At stage ``k`` the frozen teacher runs at the stage's width (set by the
    :class:`~distill.callbacks.pwkd.PWKDStages` callback from ``current_epoch``) and the base terms
    run unchanged. Connectors sized by teacher channels (FitNet's regressor, CRD's teacher
    embedding) follow the active width; CRD's teacher memory is reset at every stage boundary.
    Logged: ``pwkd/stage``, ``pwkd/teacher_width``, ``val/stage<k>_top1`` and the teacher's top-1
    at each stage's width (``val/teacher_top1``, measured once per stage).

    Args:
        teacher_weights: the slimmable teacher: a ``SlimmableSupervised`` checkpoint or its
            state_dict; ``{teacher}`` is replaced by the teacher's name (the convention of the
            ``lightning_configs/pwkd`` files). An ordinary checkpoint is made slimmable at the whole
            width only, so it serves whole-width stages (ablations) only.
        stage_teacher_weights: the ablation "slimmable teacher vs separately trained narrow
            teachers" (METHODS.md §3), instead of ``teacher_weights``: one checkpoint per stage, stage
            ``k``'s teacher trained alone at that stage's width (``SlimmableSupervised`` with
            ``train_widths: [w]``, or an ordinary teacher for width 1.0); ``{teacher}`` as above.
        connectors: ``sliced`` ([chosen] default): one connector for the whole teacher, sliced to
            the active width; ``fresh``: a separately initialised connector per stage (under DDP
            this needs ``strategy: ddp_find_unused_parameters_true``).

    Other arguments as :class:`~distill.methods.kd.OfflineKD`.
    """

    def __init__(
        self,
        connectors: Literal["sliced", "fresh"] = "sliced",
        stage_teacher_weights: Sequence[str] | None = None,
        **kwargs,
    ):
        if connectors not in ("sliced", "fresh"):
            raise ValueError(f"PWKD connectors must be 'sliced' or 'fresh', got {connectors!r}")
        self.connectors = connectors
        self.stage_teacher_weights = list(stage_teacher_weights or [])
        self.stage_teachers: list[nn.Module] = []  # unregistered, like the teacher; one per stage in the ablation
        super().__init__(**kwargs)
        self.stage_widths: tuple[float, ...] | None = None
        self.stage = -1  # the stage entered last (checkpointed: its boundary actions are not repeated on resume)

    def load_teacher(self, name: str, weights: str | None, model_kwargs: dict | None):
        """The slimmable teacher (or the first stage teacher); ``{teacher}`` in paths is replaced by its name.

        The record's ``widths`` are the widths the teacher was trained at (one list per stage teacher).
        """
        if not self.stage_teacher_weights:
            return self._load_slimmable(name, weights.format(teacher=name) if weights else None, model_kwargs)
        if weights:
            raise ValueError(
                "PWKD takes teacher_weights or stage_teacher_weights, not both (set teacher_weights: null)"
            )
        loaded = [
            self._load_slimmable(name, path.format(teacher=name), model_kwargs, "stage_teacher_weights")
            for path in self.stage_teacher_weights
        ]
        self.stage_teachers = [teacher for teacher, _ in loaded]
        info = {key: [record[key] for _, record in loaded] for key in ("weights", "sha256", "widths")}
        return self.stage_teachers[0], {"arch": name, **info}

    def _load_slimmable(self, name: str, path: str | None, model_kwargs: dict | None, key: str = "teacher_weights"):
        def load(teacher: nn.Module, path: str | None) -> None:
            """Without weights (smoke tests only) a random teacher at the default widths."""
            if path:
                load_slimmable(teacher, path, image_size=self.image_size)
            else:
                make_slimmable(teacher, DEFAULT_WIDTHS, self.image_size)

        teacher, info = build_teacher(
            name, path, self.num_classes, self.in_chans, model_kwargs, load=load, weights_key=key
        )
        info["widths"] = trained_widths(path, teacher.slimmable_widths) if path else list(teacher.slimmable_widths)
        return teacher, info

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)  # moves the attached teacher
        for teacher in self.__dict__.get("stage_teachers", ()):
            if teacher is not self.__dict__.get("teacher"):
                teacher._apply(fn, *args, **kwargs)
        return self

    @property
    def teacher_widths(self) -> tuple[float, ...]:
        """The widths the teacher network(s) can run at (whether trained there or not)."""
        return tuple(sorted({w for teacher in self.stage_teachers or [self.teacher] for w in teacher.slimmable_widths}))

    def _teacher_at(self, width: float) -> nn.Module:
        return next(t for t in self.stage_teachers or [self.teacher] if width in t.slimmable_widths)

    # ---- stages (driven by the PWKDStages callback) -------------------------------------------
    def prepare_stages(self, widths: Sequence[float]) -> None:
        """Check each stage's teacher was trained at the stage's width; make width-dependent connectors follow it."""
        record = self.teacher_info
        if self.stage_teachers:
            if len(self.stage_teachers) != len(widths):
                raise ValueError(
                    f"PWKD has {len(self.stage_teachers)} stage_teacher_weights for {len(widths)} stages {list(widths)}"
                )
            for k, (width, trained) in enumerate(zip(widths, record["widths"])):
                if width not in trained:
                    raise ValueError(
                        f"PWKD stage {k} runs its teacher at width {width}, but {record['weights'][k]} was trained at "
                        f"widths {trained}; train it with train_widths: [{width}]"
                    )
        else:
            missing = sorted(set(widths) - set(record["widths"]))
            if missing:
                raise ValueError(
                    f"PWKD stage widths {missing} are not widths the teacher was trained at ({record['widths']}, "
                    f"from {record['weights']}); train a slimmable teacher at them (lightning_configs/pwkd/*/teachers/)"
                )
        if self.stage_widths is not None:
            if tuple(widths) != self.stage_widths:
                raise ValueError(
                    f"PWKD stages changed from {list(self.stage_widths)} to {list(widths)} on the same module"
                )
            return
        self.stage_widths = tuple(widths)
        for term in self.terms:
            self._follow_teacher_width(term, widths)

    def _follow_teacher_width(self, term: nn.Module, widths: Sequence[float]) -> None:
        """Replace each connector of ``term`` that the term sizes differently for a narrower teacher."""
        narrower = sorted(set(self.teacher_widths) - {1.0})
        with torch.random.fork_rng(devices=[]):  # the templates leave the RNG untouched
            templates = {w: self._built_for(term, w) for w in narrower}
        for name, whole in list(term.named_children()):
            shape = _shapes(whole)
            changed = [w for w in narrower if _shapes(getattr(templates[w], name)) != shape]
            if not changed:
                continue
            if self.connectors == "sliced":
                narrow = {w: getattr(templates[w], name) for w in changed}
                for w, module in narrow.items():
                    if not _fits_inside(_shapes(module), shape):
                        raise ValueError(
                            f"the {term.name} connector {name!r} changes structure at teacher width {w}; "
                            "it cannot be sliced (set connectors: fresh)"
                        )
                setattr(term, name, SlicedConnector(whole, narrow))
            else:
                setattr(term, name, PerStageConnector([getattr(self._built_for(term, w), name) for w in widths]))

    def _built_for(self, term: nn.Module, width: float) -> nn.Module:
        """A copy of ``term`` built (as OfflineKD.build_terms does) against the teacher at ``width``."""
        probe = torch.zeros(2, self.in_chans, self.image_size, self.image_size, device=self.device)
        was_training = self.student.training
        self.student.eval()
        teacher = self._teacher_at(width)
        set_width(teacher, width)
        try:
            with torch.no_grad():
                s, t = self.student(probe, features=True), teacher(probe, features=True)
        finally:
            set_width(teacher, 1.0)
            self.student.train(was_training)
        built = copy.deepcopy(term)
        built.build(s, t)
        return built

    def enter_stage(self, stage: int, width: float) -> None:
        """Run the stage's teacher and the connectors at ``width``; on entering a new stage, reset CRD's
        teacher memory."""
        if self.stage_teachers:
            object.__setattr__(self, "teacher", self.stage_teachers[stage])
        set_width(self.teacher, width)
        for module in self.terms.modules():
            if isinstance(module, SlicedConnector):
                module.width = width
            elif isinstance(module, PerStageConnector):
                module.stage = stage
        if stage != self.stage:
            if self.stage >= 0:
                for module in self.terms.modules():
                    if isinstance(module, ContrastMemory):
                        reset_teacher_memory(module, stage)
            self.stage = stage
            self.teacher_measured = False  # measure the teacher at this stage's width

    # ---- Lightning hooks ---------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.stage_widths is None:
            raise ValueError(
                "PWKD needs the distill.callbacks.pwkd.PWKDStages callback in trainer.callbacks "
                "(the lightning_configs/pwkd files add it)"
            )
        super().setup(stage)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        strategy = self.trainer.strategy
        finds_unused = isinstance(strategy, DDPStrategy) and strategy._ddp_kwargs.get("find_unused_parameters")
        if self.connectors == "fresh" and isinstance(strategy, DDPStrategy) and not finds_unused:
            raise ValueError(
                "PWKD connectors: fresh leaves the other stages' connectors unused; under DDP set "
                "trainer.strategy: ddp_find_unused_parameters_true"
            )

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.log_dict({"pwkd/stage": float(self.stage), "pwkd/teacher_width": float(self.stage_widths[self.stage])})

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        metric = self.metrics["val_main"]["top1"]
        if not self.trainer.sanity_checking and metric.update_count and self.stage >= 0:
            self.log(f"val/stage{self.stage}_top1", metric.compute())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["pwkd_stage"] = self.stage

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.stage = checkpoint.get("pwkd_stage", -1)


def _shapes(module: nn.Module) -> dict[str, torch.Size]:
    return {name: t.shape for name, t in module.state_dict().items() if isinstance(t, torch.Tensor)}


def _fits_inside(narrow: dict[str, torch.Size], whole: dict[str, torch.Size]) -> bool:
    return narrow.keys() == whole.keys() and all(
        len(narrow[k]) == len(whole[k]) and all(a <= b for a, b in zip(narrow[k], whole[k])) for k in narrow
    )
