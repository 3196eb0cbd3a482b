"""A frozen teacher that stays out of the optimiser, the checkpoint, DDP and SyncBatchNorm.

The teacher is held as a plain attribute, not a registered child (docs/design.md#the-frozen-teacher): it is not in
``state_dict`` (the checkpoint records its weights file and SHA-256 instead, and the name the file was
resolved from, such as ``timm:resnet50.a1_in1k``), DDP neither wraps nor broadcasts it,
``sync_batchnorm`` does not convert it, and ``model.train()`` leaves it in eval mode.
Device and dtype moves still reach it through :meth:`TeacherMixin._apply`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, MissingFileError
from ..models import StagedNet, create_model, load_weights
from ..models.pretrained import is_named, resolve_named
from ..models.weights import file_sha256
from ..run_dirs import run_checkpoint


def load_plain(teacher: nn.Module, weights: str | None) -> None:
    if weights:
        load_weights(teacher, weights)


def build_teacher(
    name: str,
    weights: str | None,
    num_classes: int,
    in_chans: int,
    model_kwargs: dict | None = None,
    load: Callable[[nn.Module, str | None], None] = load_plain,
    weights_key: str = "teacher_weights",
) -> tuple[StagedNet, dict]:
    """Create the teacher, ``load`` its weights (PWKD passes a slimmable loader), freeze it; return
    it with a record of where it came from. ``weights`` is a path, a name resolved from the local cache
    (:mod:`distill.models.pretrained`), or a run directory (:func:`distill.run_dirs.run_checkpoint`:
    ``runs/<name>`` is the newest finished run of that name; the record holds the file used);
    ``weights_key`` is the argument a missing file is named by."""
    if is_named(weights):
        file = resolve_named(weights, name, weights_key)
    else:
        file = weights = run_checkpoint(weights, weights_key) if weights else weights
    if file and not Path(file).is_file():
        raise MissingFileError(
            f"teacher checkpoint {weights!r} ({name}) does not exist: train the teacher first "
            "(the config that sets this path "
            f"names, in its comments, the run that writes it) or set model.init_args.{weights_key}"
        )
    teacher = create_model(name, num_classes=num_classes, in_chans=in_chans, **(model_kwargs or {}))
    load(teacher, str(file) if file else None)
    info = {"arch": name, "weights": None, "sha256": None}
    if weights:
        info.update(weights=str(Path(file)), sha256=file_sha256(file))
    if is_named(weights):
        info["name"] = weights
    teacher.requires_grad_(False)
    teacher.eval()
    return teacher, info


class TeacherMixin:
    """Keeps ``self.teacher`` unregistered, moves it with the module and records its identity."""

    teacher_train_mode: bool = False  # SOKD's official code runs the teacher in train mode
    teacher_measured: bool = False

    def attach_teacher(self, teacher: nn.Module, info: dict) -> None:
        object.__setattr__(self, "teacher", teacher)
        self.teacher_info = info

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if "teacher" in self.__dict__:
            self.teacher._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        if "teacher" in self.__dict__:
            self.teacher.train(mode and self.teacher_train_mode)
        return self

    def on_train_batch_start(self, batch, batch_idx) -> None:
        # Lightning does not call ``train()`` when fitting starts and, after validation, restores the
        # modes of registered modules only: the unregistered teacher's mode is set here (when it differs).
        if self.teacher.training != self.teacher_train_mode:
            self.teacher.train(self.teacher_train_mode)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["distill_teacher"] = dict(self.teacher_info)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("distill_teacher")
        if saved and saved.get("sha256") != self.teacher_info.get("sha256"):
            raise ConfigError(
                f"the teacher weights differ from those the checkpoint was trained with: checkpoint has "
                f"{saved.get('weights')} (sha256 {saved.get('sha256')}), this run loads "
                f"{self.teacher_info.get('weights')} (sha256 {self.teacher_info.get('sha256')})"
            )

    @torch.no_grad()
    def teacher_forward(self, images: torch.Tensor):
        return self.teacher(images, features=True)

    def teacher_eval_logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The teacher's logits until its validation top-1 has been measured once in this fit."""
        if self.teacher_measured:
            return {}
        with torch.no_grad():  # evaluation runs in eval mode: train(False) reached the teacher too
            return {"teacher": self.teacher(images)}

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        metric = self.metrics["val_teacher"]["top1"]
        if not self.trainer.sanity_checking and not self.teacher_measured and metric.update_count:
            self.teacher_info["val_top1"] = float(metric.compute())
            self.teacher_measured = True
