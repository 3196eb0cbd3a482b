"""Initialisation phases of terms (AB, FT, FSP style) on the stage mechanism: what each phase trains,
the LR, the optimiser state at the boundary, and exact resume in the middle of the phase."""

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import yaml
from helpers import CONFIGS, FAST
from torch import nn

from distill.callbacks import StagePlan
from distill.cli import main
from distill.data import DigitsDataModule
from distill.losses import DistillTerm, KDTerm
from distill.methods import OfflineKD
from distill.models import create_model

DIGITS = dict(num_classes=10, in_chans=1, image_size=16)
LR = 0.05


class HintInit(DistillTerm):
    """A FitNet-like term with an initialisation phase: a 1x1 connector from the student's middle stage to
    the teacher's. ``trains_student``: the phase trains the student's stem and stages too (AB, FSP);
    otherwise only the connector, which then stays fixed while its loss joins the main training (FT)."""

    name = "hint"
    reads_teacher = frozenset({"stages"})

    def __init__(self, weight: float = 1.0, init_epochs: int = 1, trains_student: bool = True):
        super().__init__(weight)
        self.init_epochs, self.init_trains_student = init_epochs, trains_student
        self.used_after_init = not trains_student
        self.connector = None

    def build(self, student, teacher):
        channels = teacher.stages[1].shape[1]
        self.connector = nn.Sequential(nn.Conv2d(student.stages[1].shape[1], channels, 1), nn.BatchNorm2d(channels))

    def init_loss(self, student, teacher):
        source = student.stages[1] if student is not None else teacher.stages[1]
        return F.mse_loss(self.connector(source), teacher.stages[1])

    def frozen_after_init(self):
        return [self.connector]

    def forward(self, student, teacher, target, index):
        return F.mse_loss(self.connector(student.stages[1]), teacher.stages[1])


class Snapshots(pl.Callback):
    """The state at the start of training and at the end of every epoch, the LR of every step and the
    optimiser state at the start of every epoch."""

    def __init__(self):
        self.states, self.lrs, self.optimizer_sizes, self.losses = [], [], [], []

    def snapshot(self, pl_module):
        self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    def on_train_start(self, trainer, pl_module):
        self.snapshot(pl_module)

    def on_train_epoch_start(self, trainer, pl_module):
        self.optimizer_sizes.append(len(trainer.optimizers[0].state))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(
            sorted(k for k in trainer.callback_metrics if k.startswith("train/loss_") and "epoch" not in k)
        )

    def on_train_epoch_end(self, trainer, pl_module):
        self.snapshot(pl_module)


class RecordingKD(OfflineKD):
    """OfflineKD that records the loss terms of every step."""

    def training_losses(self, images, targets, index):
        losses, logits = super().training_losses(images, targets, index)
        self.recorded.append(sorted(losses))
        return losses, logits


def fit(term: DistillTerm, epochs: int = 3):
    torch.manual_seed(0)
    module = RecordingKD(student="resnet8", teacher="resnet20", terms=[term, KDTerm()], lr=LR, **DIGITS)
    module.recorded = []
    record = Snapshots()
    trainer = pl.Trainer(
        max_epochs=epochs,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=[StagePlan(), record],
    )
    trainer.fit(module, DigitsDataModule(batch_size=16))
    record.losses = module.recorded
    return module, record


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def prefixes(keys: set[str]) -> set[str]:
    return {k.split(".")[0] + "." + k.split(".")[1] for k in keys}


def test_an_init_phase_that_trains_the_student_backbone():
    module, record = fit(HintInit(init_epochs=1, trains_student=True))
    assert [s.name for s in module.stage_plan] == ["hint init", "main"] and module.stage_bounds == [0, 1, 3]
    init = changed(record.states[0], record.states[1])
    assert init and all(k.startswith(("student.conv1", "student.bn1", "student.layer", "terms.0.")) for k in init)
    assert not any(k.startswith("student.fc") for k in init)  # the classifier waits for the main training
    assert record.losses[0] == ["hint_init"]
    main = changed(record.states[1], record.states[3])
    assert any(k.startswith("student.fc") for k in main) and not any(k.startswith("terms.0.") for k in main)
    assert record.losses[-1] == ["ce", "kd"]  # AB, FSP: their loss does not join the main training
    assert record.lrs[:2] == pytest.approx([LR, LR])  # constant in the initialisation phase
    assert record.optimizer_sizes[:2] == [0, 0] and record.optimizer_sizes[2] > 0  # fresh when the main training starts


def test_an_init_phase_that_trains_only_the_term_then_keeps_it_fixed():
    module, record = fit(HintInit(init_epochs=2, trains_student=False), epochs=3)
    init = changed(record.states[0], record.states[2])
    assert init and all(k.startswith("terms.0.") for k in init)  # the student is not even run
    main = changed(record.states[2], record.states[3])
    assert not any(k.startswith("terms.0.") for k in main)  # BN statistics included: frozen in eval mode
    assert any(k.startswith("student.") for k in main)
    assert record.losses[-1] == ["ce", "hint", "kd"]


@pytest.mark.slow
def test_init_phase_resumed_mid_phase_equals_uninterrupted(in_tmp):
    """Through the CLI: a 2-epoch init phase, stopped after its first epoch and resumed, ends bit-identical."""
    terms = in_tmp / "terms.yaml"
    term = {"class_path": "test_init_phase.HintInit", "init_args": {"init_epochs": 2}}
    terms.write_text(
        yaml.safe_dump({"model": {"init_args": {"terms": [term, {"class_path": "distill.losses.KDTerm"}]}}})
    )
    torch.manual_seed(0)
    torch.save(create_model("resnet20", num_classes=10, in_chans=1).state_dict(), in_tmp / "teacher.pt")
    args = [
        "fit",
        *("--config", str(CONFIGS / "digits/pair.yaml")),
        *("--config", str(terms)),
        f"--model.init_args.teacher_weights={in_tmp / 'teacher.pt'}",
        "--trainer.max_epochs=4",
        *FAST,
    ]
    main([*args, "--trainer.logger.init_args.name=straight"])
    main([*args, "--trainer.logger.init_args.name=split", "--trainer.max_steps=2"])  # the end of epoch 0
    split = in_tmp / "runs/split/version_0/checkpoints/last.ckpt"
    main([*args, f"--ckpt_path={split}"])
    straight = torch.load(in_tmp / "runs/straight/version_0/checkpoints/last.ckpt", weights_only=True)
    resumed = torch.load(split, weights_only=True)
    assert straight["callbacks"]["StagePlan"]["stages"] == ["hint init", "main"]
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
