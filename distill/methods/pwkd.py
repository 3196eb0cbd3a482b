"""PWKD — Partial to Whole Knowledge Distillation (Zhang, Zhang, Sun, 2021).

:class:`PWKD` distils a student from a slimmable teacher (trained by
:class:`~distill.methods.slimmable_supervised.SlimmableSupervised`) stage by stage, narrow (partial)
to whole, over any offline base method: one stage per entry of ``stage_widths``, each with a cosine
LR cycle restarted at its start (the ``StagePlan`` callback, ``--stages.*``, sets the epochs and
can override the LR for ablations).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from .. import checks
from ..errors import ConfigError
from ..losses.crd import ContrastMemory
from ..models.slimmable import DEFAULT_WIDTHS, load_slimmable, make_slimmable, set_width
from ..models.staged import dry_run
from ..models.weights import load_checkpoint
from ..stages import Stage
from .connectors import PerStageConnector, SlicedConnector, fits_inside, tensor_shapes
from .kd import OfflineKD
from .teacher import build_teacher


def trained_widths(path: str, held: Sequence[float]) -> list[float]:
    """The widths the checkpoint at ``path`` was trained at: the ``train_widths`` its ``SlimmableSupervised``
    run recorded among its hyper-parameters, else every width it holds (``held``). Memory-mapped: the
    tensors, already read by the loader, are not read again."""
    checkpoint = load_checkpoint(path, mmap=True)
    recorded = (checkpoint.get("hyper_parameters") or {}).get("train_widths") if isinstance(checkpoint, dict) else None
    return sorted(float(w) for w in recorded) if recorded else [float(w) for w in held]


def reset_teacher_memory(memory: ContrastMemory, stage: int) -> None:
    """[chosen] CRD at a stage boundary: the teacher bank restarts from a fresh uniform draw (as at
    the start of training, generator seeded by ``seed + stage``, identical on every rank), and the
    normalisation constants are re-estimated on the stage's first step."""
    memory.reset_teacher(memory.seed + stage)


def connector_paths(term: nn.Module) -> list[str]:
    """The term's connectors, as paths: its children, and the elements of a child ModuleList."""
    paths = []
    for name, child in term.named_children():
        if isinstance(child, nn.ModuleList):
            paths += [f"{name}.{index}" for index in range(len(child))]
        else:
            paths.append(name)
    return paths


class PWKD(OfflineKD):
    """Partial-to-whole distillation: the student learns from a slimmable teacher stage by stage.

    At stage ``k`` the frozen teacher runs at ``stage_widths[k]`` and the base terms run unchanged.
    Connectors sized by teacher channels (FitNet's regressor, CRD's teacher embedding) follow the
    active width; CRD's teacher memory is reset at every stage boundary. Logged: ``stage``,
    ``pwkd/teacher_width``, ``val/stage<k>_top1`` and the teacher's top-1 at each stage's width
    (``val/teacher_top1``, measured once per stage).

    Args:
        stage_widths: the teacher width of each stage, narrow to whole, ending at 1.0 ([chosen] default
            0.25, 0.5, 0.75, 1.0). Repeats are allowed: ``[1.0, 1.0, 1.0, 1.0]`` is the whole-only
            ablation with the same cyclic schedule.
        reverse_order: the reversed-order ablation: widths whole to narrow, starting at 1.0.
        teacher_weights: the slimmable teacher: a ``SlimmableSupervised`` checkpoint or its
            state_dict; ``{teacher}`` is replaced by the teacher's name (the convention of the
            ``lightning_configs/pwkd`` files). An ordinary checkpoint is made slimmable at the whole
            width only, so it serves whole-width stages (ablations) only.
        stage_teacher_weights: the ablation "slimmable teacher vs separately trained narrow
            teachers", instead of ``teacher_weights``: one checkpoint per stage, stage ``k``'s teacher
            trained alone at that stage's width (``SlimmableSupervised`` with ``train_widths: [w]``, or
            an ordinary teacher for width 1.0); ``{teacher}`` as above.
        connectors: ``sliced`` ([chosen] default): one connector for the whole teacher, sliced to
            the active width; ``fresh``: a separately initialised connector per stage (under DDP
            this needs ``strategy: ddp_find_unused_parameters_true``).

    Other arguments as :class:`~distill.methods.kd.OfflineKD`.

    The stage epochs and LR come from the ``StagePlan`` callback (``--stages.*``): by default an
    equal split with a cosine restarted per stage; ``stages.lr: monotone`` (one cosine) and
    ``stages.lr: base`` (the configured schedule) are the schedule ablations.
    """

    def __init__(
        self,
        stage_widths: Sequence[float] = DEFAULT_WIDTHS,
        reverse_order: bool = False,
        connectors: Literal["sliced", "fresh"] = "sliced",
        stage_teacher_weights: Sequence[str] | None = None,
        **kwargs,
    ):
        widths = [float(w) for w in stage_widths]
        for w in widths:
            checks.fraction("PWKD", "stage_widths", w)
        order = widths[::-1] if reverse_order else widths
        if not widths or order != sorted(order) or order[-1] != 1.0:
            expected = "start at 1.0 and do not increase" if reverse_order else "do not decrease and end at 1.0"
            raise ConfigError(f"PWKD stage_widths={widths}: expected widths in (0, 1] that {expected}")
        checks.choice("PWKD", "connectors", connectors, ("sliced", "fresh"))
        self.connectors = connectors
        self.stage_teacher_weights = list(stage_teacher_weights or [])
        self.stage_teachers: list[nn.Module] = []  # unregistered, like the teacher; one per stage in the ablation
        super().__init__(**kwargs)
        self.stage_widths = tuple(widths)
        self.stage = -1  # the stage entered last (checkpointed: its boundary actions are not repeated on resume)
        self.check_teacher_widths()
        for term in self.terms:
            self._follow_teacher_width(term, widths)

    def load_teacher(self, name: str, weights: str | None, model_kwargs: dict | None):
        """The slimmable teacher (or the first stage teacher); ``{teacher}`` in paths is replaced by its name.

        The record's ``widths`` are the widths the teacher was trained at (one list per stage teacher).
        """
        if not self.stage_teacher_weights:
            return self._load_slimmable(name, weights.format(teacher=name) if weights else None, model_kwargs)
        if weights:
            raise ConfigError(
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
        held = teacher.slimmable_widths
        info["widths"] = trained_widths(info["weights"], held) if info["weights"] else list(held)
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

    # ---- stages (driven by the StagePlan callback) ---------------------------------------------
    def method_stages(self) -> list[Stage]:
        """One stage per teacher width, each with its own cosine cycle ([chosen] cosine shape)."""
        return [Stage(f"width {w:g}", lr="cyclic", spec=w) for w in self.stage_widths]

    def check_teacher_widths(self) -> None:
        """Each stage's teacher must have been trained at the stage's width."""
        widths = self.stage_widths
        record = self.teacher_info
        if self.stage_teachers:
            if len(self.stage_teachers) != len(widths):
                raise ConfigError(
                    f"PWKD has {len(self.stage_teachers)} stage_teacher_weights for {len(widths)} stage_widths "
                    f"{list(widths)}: expected one teacher file per stage"
                )
            for k, (width, trained) in enumerate(zip(widths, record["widths"])):
                if width not in trained:
                    raise ConfigError(
                        f"PWKD stage {k} runs its teacher at width {width}, but {record['weights'][k]} was trained at "
                        f"widths {trained}; train it with train_widths: [{width}]"
                    )
        else:
            missing = sorted(set(widths) - set(record["widths"]))
            if missing:
                raise ConfigError(
                    f"PWKD stage widths {missing} are not widths the teacher was trained at ({record['widths']}, "
                    f"from {record['weights']}); train a slimmable teacher at them (lightning_configs/pwkd/*/teachers/)"
                )

    def on_stage(self, index: int, stage: Stage) -> None:
        """Enter width stage ``k`` (counted after any initialisation phase; [chosen] an initialisation
        phase runs the teacher at the first stage's width)."""
        super().on_stage(index, stage)
        k = max(0, index - (len(self.stage_plan) - len(self.stage_widths)))
        self.enter_stage(k, self.stage_widths[k])

    @property
    def leaves_parameters_unused(self) -> bool:
        """Fresh connectors: only the active stage's connector is used."""
        return self.connectors == "fresh"

    def _follow_teacher_width(self, term: nn.Module, widths: Sequence[float]) -> None:
        """Replace each connector of ``term`` that the term sizes differently for a narrower teacher (the
        elements of a ModuleList of connectors one by one: VID, OFD, ReviewKD, AB)."""
        narrower = sorted(set(self.teacher_widths) - {1.0})
        with torch.random.fork_rng(devices=[]):  # the templates leave the RNG untouched
            templates = {w: self._built_for(term, w) for w in narrower}
        for path in connector_paths(term):
            whole = term.get_submodule(path)
            shape = tensor_shapes(whole)
            changed = [w for w in narrower if tensor_shapes(templates[w].get_submodule(path)) != shape]
            if not changed:
                continue
            if self.connectors == "sliced":
                narrow = {w: templates[w].get_submodule(path) for w in changed}
                for w, module in narrow.items():
                    if not fits_inside(tensor_shapes(module), shape):
                        raise ConfigError(
                            f"the {term.name} connector {path!r} changes structure at teacher width {w}; "
                            "it cannot be sliced (set connectors: fresh)"
                        )
                replacement = SlicedConnector(whole, narrow)
            else:
                replacement = PerStageConnector([self._built_for(term, w).get_submodule(path) for w in widths])
            parent, _, name = path.rpartition(".")
            setattr(term.get_submodule(parent) if parent else term, name, replacement)

    def _built_for(self, term: nn.Module, width: float) -> nn.Module:
        """A copy of ``term`` built (as OfflineKD.build_terms does) against the teacher at ``width``."""
        teacher = self._teacher_at(width)
        set_width(teacher, width)
        try:
            s = dry_run(self.student, self.in_chans, self.image_size)
            t = dry_run(teacher, self.in_chans, self.image_size)
        finally:
            set_width(teacher, 1.0)
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

    def teacher_setting(self) -> dict:
        """The stage entered last and its teacher width: a teacher cache records them per epoch."""
        if self.stage < 0:
            raise RuntimeError("PWKD has entered no stage yet (its stages are entered at every epoch start)")
        return {"stage": self.stage, "width": self.stage_widths[self.stage]}

    # ---- Lightning hooks ---------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.stage_bounds is None:
            raise ConfigError(
                "PWKD needs the distill.callbacks.StagePlan callback in trainer.callbacks (the distill CLI adds it)"
            )
        super().setup(stage)

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.log("pwkd/teacher_width", float(self.stage_widths[self.stage]), on_epoch=True, on_step=False)

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
