"""The small base every method module stands on: optimiser, per-step LR schedule, metrics, logging.

A method only says what it trains (``training_losses``) and which networks it evaluates
(``eval_logits``); everything else is here, so a method reads in a minute (DESIGN.md, after
mdistiller and solo-learn).
"""

from __future__ import annotations

import math
from typing import Literal

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from .. import checks
from ..models import StagedNet
from ..schedules import MultiStep, Schedule

MAIN = "main"  # the name of the network a method trains (the student): its metrics are val/top1, train/top1


def top_k_metrics(num_classes: int) -> nn.ModuleDict:
    """Micro-averaged top-1/top-5 (torchmetrics defaults to macro for multiclass: DESIGN.md pitfall)."""
    return nn.ModuleDict(
        {
            "top1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
            "top5": MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro"),
        }
    )


class DistillModule(pl.LightningModule):
    """Base LightningModule of every method.

    Args:
        num_classes: classes of the dataset (linked from the DataModule by the CLI).
        in_chans: input channels (linked from the DataModule).
        image_size: input side length (linked from the DataModule); used for dry runs.
        optimizer: ``sgd`` (protocol) or ``adamw``.
        lr: base learning rate (CRD protocol 0.05; 0.01 for MobileNetV2/ShuffleNet students).
        momentum: SGD momentum.
        weight_decay: weight decay on every parameter (CRD protocol 5e-4).
        nesterov: SGD Nesterov momentum.
        lr_schedule: LR multiplier as a function of the fractional epoch; default ×0.1 at 150/180/210.
        lr_reference_batch: if set, the linear scaling rule: lr × global batch / this value.
        channels_last: run every network (teacher included) and its inputs in channels-last memory
            format (faster convolutions on GPUs with tensor cores, notably under ``bf16-mixed``).
        compile: ``torch.compile`` every network in place (``nn.Module.compile``), so checkpoint
            keys do not change.

    Mixed precision is the Trainer's: ``--trainer.precision bf16-mixed``. Losses cast to fp32 and the
    frozen teacher runs under the same autocast, i.e. in reduced precision.
    """

    eval_names: tuple[str, ...] = (MAIN,)  # networks evaluated; MAIN logs as val/top1, the others as val/<name>_top1

    def __init__(
        self,
        num_classes: int = 100,
        in_chans: int = 3,
        image_size: int = 32,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = False,
        lr_schedule: Schedule | None = None,
        lr_reference_batch: int | None = None,
        channels_last: bool = False,
        compile: bool = False,
    ):
        super().__init__()
        owner = type(self).__name__
        checks.choice(owner, "optimizer", optimizer, ("sgd", "adamw"))
        checks.positive(owner, "lr", lr)
        checks.fraction(owner, "momentum", momentum, zero=True, one=False)
        checks.non_negative(owner, "weight_decay", weight_decay)
        if lr_reference_batch is not None:
            checks.positive_int(owner, "lr_reference_batch", lr_reference_batch)
        self.num_classes, self.in_chans, self.image_size = num_classes, in_chans, image_size
        self.optimizer_name, self.lr, self.momentum = optimizer, lr, momentum
        self.weight_decay, self.nesterov = weight_decay, nesterov
        self.lr_schedule = lr_schedule if lr_schedule is not None else MultiStep()
        self.lr_reference_batch = lr_reference_batch
        self.channels_last, self.compile_networks = channels_last, compile
        self._networks_configured = False
        self.steps_per_epoch = 1
        self.metrics = nn.ModuleDict(
            {
                f"{split}_{name}": top_k_metrics(num_classes)
                for split in ("train", "val", "test")
                for name in self.eval_names
            }
        )
        self.best: dict[str, float] = {}

    # ---- what a method defines -------------------------------------------------------------
    def training_losses(self, images, targets, index) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Return the *weighted* loss terms (summed into the total) and the main network's logits
        (``None`` where a step computes none)."""
        raise NotImplementedError

    def eval_logits(self, images) -> dict[str, torch.Tensor]:
        """Logits of every evaluated network, keyed by ``eval_names``."""
        return {MAIN: self(images)}

    def param_groups(self) -> list[dict]:
        """Parameter groups for the optimiser (one group by default)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def networks(self) -> list[nn.Module]:
        """The networks a forward pass runs: registered staged models, plus an attached teacher."""
        nets = [m for m in self.children() if isinstance(m, StagedNet)]
        teacher = self.__dict__.get("teacher")
        return nets + ([teacher] if teacher is not None else [])

    def configure_model(self) -> None:
        if self._networks_configured:
            return
        self._networks_configured = True
        for net in self.networks():
            if self.channels_last:
                net.to(memory_format=torch.channels_last)
            if self.compile_networks:
                net.compile()

    def format_input(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    # ---- optimisation ----------------------------------------------------------------------
    def base_lr(self) -> float:
        if self.lr_reference_batch is None:
            return self.lr
        trainer = self.trainer
        batch = trainer.datamodule.batch_size * trainer.world_size * trainer.accumulate_grad_batches
        return self.lr * batch / self.lr_reference_batch

    def configure_optimizers(self):
        self.trainer.fit_loop.setup_data()  # counts the training batches (also with only max_steps set)
        self.steps_per_epoch = max(
            1, math.ceil(self.trainer.num_training_batches / self.trainer.accumulate_grad_batches)
        )
        lr = self.base_lr()
        groups = self.param_groups()
        if self.optimizer_name == "sgd":
            optimizer = torch.optim.SGD(
                groups, lr=lr, momentum=self.momentum, weight_decay=self.weight_decay, nesterov=self.nesterov
            )
        else:
            optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=self.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_factor(self, step: int) -> float:
        return self.lr_schedule(step / self.steps_per_epoch)

    # ---- steps -----------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        images, targets, index = batch
        terms, logits = self.training_losses(self.format_input(images), targets, index)
        loss = torch.stack(list(terms.values())).sum()
        log = {f"train/loss_{name}": value.detach() for name, value in terms.items()}
        log["train/loss"] = loss.detach()
        log["lr"] = torch.tensor(self.optimizers().param_groups[0]["lr"])
        self.log_dict(log, on_step=True, on_epoch=True, batch_size=len(targets))
        if logits is not None:  # a phase without labels (SSKD's backbone phases) computes no logits
            self._log_accuracy("train", {MAIN: logits.detach()}, targets)
        return loss

    def validation_step(self, batch, batch_idx):
        self._evaluate("val", batch)

    def test_step(self, batch, batch_idx):
        self._evaluate("test", batch)

    def _evaluate(self, split: str, batch) -> None:
        images, targets, _ = batch
        self._log_accuracy(split, self.eval_logits(self.format_input(images)), targets)

    def _log_accuracy(self, split: str, logits: dict[str, torch.Tensor], targets: torch.Tensor) -> None:
        for name, value in logits.items():
            metrics = self.metrics[f"{split}_{name}"]
            prefix = f"{split}/" if name == MAIN else f"{split}/{name}_"
            for k, metric in metrics.items():
                metric.update(value, targets)  # computed once per epoch when logged
                self.log(f"{prefix}{k}", metric, on_step=False, on_epoch=True, batch_size=len(targets))

    @property
    def selects_best(self) -> bool:
        """Whether this epoch's ``val/top1`` may be the run's best (``val/top1_best``, the best checkpoint)."""
        return True

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        for name in self.eval_names:
            if name == MAIN and not self.selects_best:
                continue
            metric = self.metrics[f"val_{name}"]["top1"]
            if metric.update_count == 0:
                continue
            key = "val/top1" if name == MAIN else f"val/{name}_top1"
            self.best[key] = max(self.best.get(key, -1.0), float(metric.compute()))
            self.log(f"{key}_best", self.best[key])

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["distill_best"] = dict(self.best)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.best = dict(checkpoint.get("distill_best", {}))
