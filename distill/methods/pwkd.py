"""PWKD — Partial to Whole Knowledge Distillation (Zhang, Zhang, Sun, 2021; METHODS.md §3).

Two modules: :class:`SlimmableSupervised` trains a teacher's weight-sharing widths jointly, and
:class:`PWKD` distills a student from that slimmable teacher stage by stage, narrow (partial) to
whole, over any offline base method. The stages, the teacher width of each and the cyclic LR are
set by the :class:`~distill.callbacks.pwkd.PWKDStages` callback.
"""
from __future__ import annotations

import copy
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from pytorch_lightning.strategies import DDPStrategy
from torch import nn

from ..losses.crd import ContrastMemory
from ..models import create_model
from ..models.slimmable import DEFAULT_WIDTHS, check_widths, load_slimmable, make_slimmable, set_width, width_name
from .base import DistillModule
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
            "trainer.sync_batchnorm=True is not supported with slimmable networks (it merges their per-width BatchNorms)"
        )


class SlimmableSupervised(DistillModule):
    """A slimmable network whose widths are trained jointly with cross-entropy (PWKD's teacher).

    Each step runs one forward per width (widest first), sums the per-width losses and takes one
    optimiser step. Every width's top-1 is logged (``val/w0_25_top1`` …); the whole width is the
    main ``val/top1``.

    Args:
        model: zoo architecture name.
        widths: the widths trained, ending at 1.0 ([chosen] default 0.25, 0.5, 0.75, 1.0).
        sandwich: [chosen] default off. On: the sandwich rule with in-place distillation, the
            whole width learns from the labels and every narrower one from its detached soft output.
        inplace_temperature: [chosen] temperature of the in-place distillation (1).
        init_weights: optional checkpoint to start from: an ordinary one of the same architecture
            (its BatchNorm slices start the narrow widths) or a slimmable one at the same widths.
        model_kwargs: extra constructor arguments of the architecture.
    """

    def __init__(
        self,
        model: str = "resnet56",
        widths: Sequence[float] = DEFAULT_WIDTHS,
        sandwich: bool = False,
        inplace_temperature: float = 1.0,
        init_weights: str | None = None,
        model_kwargs: dict | None = None,
        **kwargs,
    ):
        self.widths = check_widths(widths)
        self.eval_names = ("",) + tuple(width_name(w) for w in self.widths[:-1])  # read by the base's metrics
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
        for width in reversed(self.widths):
            set_width(self.model, width)
            logits = self.model(images)
            if width == 1.0:
                whole = logits
                losses["ce"] = F.cross_entropy(logits.float(), targets)
            elif self.sandwich:
                losses[f"kd_{width_name(width)}"] = soft_cross_entropy(logits, whole.detach(), self.inplace_temperature)
            else:
                losses[f"ce_{width_name(width)}"] = F.cross_entropy(logits.float(), targets)
        set_width(self.model, 1.0)
        return losses, whole

    def eval_logits(self, images):
        logits = {}
        for width in self.widths:
            set_width(self.model, width)
            logits["" if width == 1.0 else width_name(width)] = self.model(images)
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
        connectors: ``sliced`` ([chosen] default): one connector for the whole teacher, sliced to
            the active width; ``fresh``: a separately initialised connector per stage (under DDP
            this needs ``strategy: ddp_find_unused_parameters_true``).
        Other arguments as :class:`~distill.methods.kd.OfflineKD`.
    """

    def __init__(self, connectors: Literal["sliced", "fresh"] = "sliced", **kwargs):
        if connectors not in ("sliced", "fresh"):
            raise ValueError(f"PWKD connectors must be 'sliced' or 'fresh', got {connectors!r}")
        self.connectors = connectors
        super().__init__(**kwargs)
        self.stage_widths: tuple[float, ...] | None = None
        self.stage = -1  # the stage entered last (checkpointed: its boundary actions are not repeated on resume)

    def load_teacher(self, name: str, weights: str | None, model_kwargs: dict | None):
        """The slimmable teacher; ``{teacher}`` in ``teacher_weights`` is replaced by its name."""
        path = weights.format(teacher=name) if weights else None

        def load(teacher: nn.Module, path: str | None) -> None:
            """Without weights (smoke tests only) a random teacher at the default widths."""
            if path:
                load_slimmable(teacher, path, image_size=self.image_size)
            else:
                make_slimmable(teacher, DEFAULT_WIDTHS, self.image_size)

        teacher, info = build_teacher(name, path, self.num_classes, self.in_chans, model_kwargs, load=load)
        info["widths"] = list(teacher.slimmable_widths)
        return teacher, info

    @property
    def teacher_widths(self) -> tuple[float, ...]:
        return self.teacher.slimmable_widths

    # ---- stages (driven by the PWKDStages callback) -------------------------------------------
    def prepare_stages(self, widths: Sequence[float]) -> None:
        """Check the teacher was trained at every stage width; make width-dependent connectors follow it."""
        missing = sorted(set(widths) - set(self.teacher_widths))
        if missing:
            raise ValueError(
                f"PWKD stage widths {missing} are not widths the teacher was trained at ({list(self.teacher_widths)}, "
                f"from {self.teacher_info['weights']}); train a slimmable teacher at them (lightning_configs/pwkd/*/teachers/)"
            )
        if self.stage_widths is not None:
            if tuple(widths) != self.stage_widths:
                raise ValueError(f"PWKD stages changed from {list(self.stage_widths)} to {list(widths)} on the same module")
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
        set_width(self.teacher, width)
        try:
            with torch.no_grad():
                s, t = self.student(probe, features=True), self.teacher(probe, features=True)
        finally:
            set_width(self.teacher, 1.0)
            self.student.train(was_training)
        built = copy.deepcopy(term)
        built.build(s, t)
        return built

    def enter_stage(self, stage: int, width: float) -> None:
        """Run the teacher and the connectors at ``width``; on entering a new stage, reset CRD's teacher memory."""
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
