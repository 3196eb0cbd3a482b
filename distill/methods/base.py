"""The small base every method module stands on: optimiser, per-step LR schedule, metrics, logging.

A method only says what it trains (``training_losses``) and which networks it evaluates
(``eval_logits``); everything else is here, so a method reads in a minute (docs/design.md#how-a-method-is-written, after
mdistiller and solo-learn).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping
from typing import ClassVar, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from .. import checks
from ..errors import ConfigError
from ..finite import NonFiniteError, divergence_message, last_checkpoint, nonfinite_tensors, nonfinite_weights_message
from ..models import StagedNet
from ..models.slimmable import fewest_channels
from ..schedules import MultiStep, Schedule
from ..stages import Stage
from .card import Network, RunCard, term_names
from .step_stats import StepStats

MAIN = "main"  # the name of the network a method trains (the student): its metrics are val/top1, train/top1
GRAD_NORM = ("gradient norm",)  # its finiteness is recorded, not logged


def log_step_due(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes step metrics after this training batch: an optimiser step at which
    ``log_every_n_steps`` is due or the fit stops (Lightning's own rule, read from its logger connector)."""
    if trainer.fit_loop._should_accumulate():
        return False
    return trainer._logger_connector.should_update_logs or bool(trainer.fast_dev_run)


def top_k_metrics(num_classes: int) -> nn.ModuleDict:
    """Micro-averaged top-1/top-5 (torchmetrics defaults to macro for multiclass:
    docs/design.md#top-1-is-micro-averaged)."""
    return nn.ModuleDict(
        {
            "top1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
            "top5": MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro"),
        }
    )


PLAIN_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def refuse_lossy_sync_batchnorm(networks: dict[str, nn.Module]) -> None:
    """``sync_batchnorm`` replaces every BatchNorm by a plain ``SyncBatchNorm``: a BatchNorm subclass with
    behaviour of its own (timm's fused BatchNorm + activation, a slimmable network's per-width
    BatchNorms) would lose it silently, so it is refused, naming the layer."""
    for name, net in networks.items():
        for path, module in net.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and type(module) not in PLAIN_BATCHNORMS:
                raise ConfigError(
                    f"trainer.sync_batchnorm=true would replace {name}.{path} ({type(module).__name__}, a BatchNorm "
                    "with behaviour of its own) by a plain SyncBatchNorm and silently drop that behaviour; "
                    "train without sync_batchnorm"
                )


CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]  # torch.compile's

# [chosen] on the CPU, torch 2.14.1 aborts with heap corruption ("double free or corruption") in the
# backward of a channels_last resnet20 whose stages have 4 or 6 channels (the 0.25 width of a slimmable
# resnet20 among them); 8 channels and more ran. Such networks are refused channels_last on the CPU.
CHANNELS_LAST_MIN_CPU = 8


def refuse_narrow_channels_last(networks: dict[str, nn.Module]) -> None:
    """Refuse ``channels_last`` on the CPU for a network with a convolution under
    :data:`CHANNELS_LAST_MIN_CPU` output channels at any of its widths, naming the layer."""
    for name, net in networks.items():
        narrowest = fewest_channels(net)
        if narrowest is not None and narrowest[1] < CHANNELS_LAST_MIN_CPU:
            raise ConfigError(
                f"model.init_args.channels_last=true: {name}.{narrowest[0]} runs {narrowest[1]} channels, and on the "
                f"CPU torch {torch.__version__} aborts with heap corruption in the channels_last backward of layers "
                f"under {CHANNELS_LAST_MIN_CPU} channels; set channels_last: false on the CPU"
            )


def require_unused_parameter_search(strategy, owner: str) -> None:
    """Refuse DDP without ``find_unused_parameters`` for a method that leaves parameters unused."""
    if isinstance(strategy, DDPStrategy) and not strategy._ddp_kwargs.get("find_unused_parameters", False):
        raise ConfigError(
            f"{owner} leaves parameters unused in some steps, so DDP must look for them: set "
            "trainer.strategy to ddp_find_unused_parameters_true (got DDP with find_unused_parameters=False)"
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
            keys do not change: ``true`` (the default mode) or a mode name, e.g. ``reduce-overhead``
            (CUDA graphs: it pays once the step has no host synchronisation).

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
        compile: bool | CompileMode = False,
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
        self.stage_schedule: Schedule | None = None  # the StagePlan's schedule over the whole run, where it sets one
        self.lr_reference_batch = lr_reference_batch
        self.channels_last, self.compile_networks = channels_last, compile
        self._networks_configured = False
        self.steps_per_epoch = 1
        self.metrics = nn.ModuleDict(
            {f"{split}_{name}": top_k_metrics(num_classes) for split in ("val", "test") for name in self.eval_names}
        )
        self.best: dict[str, float] = {}
        self.stage_plan: list[Stage] = []  # the stages and their bounds, set by the StagePlan callback at fit setup
        self.stage_bounds: list[int] | None = None
        self.entered_stage: int | None = None  # the stage entered last (StagePlan's on_stage)
        self.stats = StepStats()  # train losses, LR and accuracy, summed on the device
        self._train_names: dict[tuple[str, ...], tuple[str, ...]] = {}
        self._grad_params: list[nn.Parameter] | None = None

    # ---- how the CLI and the tools see this method (from init arguments alone) -----------------
    exported: ClassVar[dict[str, Network]] = {"student": Network("student.", "student", "student_kwargs")}

    @classmethod
    def card(cls, args: Mapping) -> RunCard:
        """How a run with these init arguments is named and tabulated; by default a distillation run
        ``teacher → student`` in the column ``<method>:<terms>`` (see :mod:`distill.methods.card`)."""
        terms = "+".join(term_names(args))
        column = cls.__name__.lower() + (f":{terms}" if terms else "")
        teacher, student = args.get("teacher"), args.get("student")
        return RunCard(column, student, teacher, tuple(n for n in (teacher, student) if n))

    # ---- what a method defines -------------------------------------------------------------
    def training_losses(self, images, targets, index) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Return the *weighted* loss terms (summed into the total) and the main network's logits
        (``None`` where a step computes none)."""
        raise NotImplementedError

    def eval_logits(self, images) -> dict[str, torch.Tensor]:
        """Logits of every evaluated network, keyed by ``eval_names``."""
        return {MAIN: self(images)}

    def stages(self) -> list[Stage]:
        """The stages this method runs through, in order (see :mod:`distill.stages`); one by default."""
        return [Stage("main")]

    def prepare_stages(self, stages: list[Stage], bounds: list[int]) -> None:
        """Called once at fit setup by the ``StagePlan`` callback with the resolved plan: ``bounds`` are the
        epochs where the stages start, then the end of the last (``[0]`` for an unbounded one-stage run)."""
        self.stage_plan, self.stage_bounds = list(stages), list(bounds)

    def on_stage(self, index: int, stage: Stage) -> None:
        """Called by the ``StagePlan`` callback at every epoch start (and before the sanity check) with the
        stage that contains ``current_epoch``: the place for what entering a stage changes. Train mode
        is re-applied, since the stage may freeze other modules."""
        self.entered_stage = index
        self.train()

    @property
    def stage_index(self) -> int | None:
        """The stage that contains ``current_epoch`` (a function of the epoch, so every hook agrees);
        ``None`` outside a fit."""
        if self.stage_bounds is None:
            return None
        last = max(0, len(self.stage_bounds) - 2)
        return min(bisect.bisect_right(self.stage_bounds, self.current_epoch) - 1, last)

    # ---- freezing (a stage that trains part of the networks) ------------------------------------
    def frozen_modules(self) -> list[nn.Module]:
        """Modules that the current step must not change: kept in eval mode (BatchNorm statistics included)."""
        return []

    def trained_parameters(self) -> list[nn.Parameter] | None:
        """The parameters the current step may change; ``None`` (the default): all of them."""
        return None

    def train(self, mode: bool = True):
        """Train mode, except for :meth:`frozen_modules` (put back in eval mode by every ``train()``)."""
        super().train(mode)
        if mode:
            for module in self.frozen_modules():
                module.eval()
        return self

    def on_before_optimizer_step(self, optimizer) -> None:
        """Clear the gradients of parameters the step may not change: SGD then skips them (no momentum, no
        weight decay), also where DDP with ``find_unused_parameters`` handed them zeros."""
        trained = self.trained_parameters()
        if trained is None:
            return
        keep = {id(p) for p in trained}
        for p in self.parameters():
            if id(p) not in keep:
                p.grad = None

    @property
    def leaves_parameters_unused(self) -> bool:
        """Whether some trained parameters get no gradient in some steps (a stage trains part of the
        networks): DDP must then look for unused parameters."""
        return False

    def param_groups(self) -> list[dict]:
        """Parameter groups for the optimiser (one group by default)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def named_networks(self) -> dict[str, nn.Module]:
        """The networks a forward pass runs, by name: registered staged models, plus an attached teacher."""
        nets = {name: m for name, m in self.named_children() if isinstance(m, StagedNet)}
        teacher = self.__dict__.get("teacher")
        return nets | ({"teacher": teacher} if teacher is not None else {})

    def networks(self) -> list[nn.Module]:
        """The networks of :meth:`named_networks`."""
        return list(self.named_networks().values())

    def configure_model(self) -> None:
        """Before the strategy wraps the module: refuse a lossy SyncBatchNorm conversion, then apply the
        memory-format and compile switches to every network."""
        trainer = self._trainer  # None when the module is configured outside a Trainer
        if trainer is not None and getattr(trainer.strategy, "_layer_sync", None) is not None:  # sync_batchnorm
            refuse_lossy_sync_batchnorm(dict(self.named_children()))
        if self._networks_configured:
            return
        if self.channels_last and self.run_device().type == "cpu":
            refuse_narrow_channels_last(self.named_networks())
        self._networks_configured = True
        for net in self.networks():
            if self.channels_last:
                net.to(memory_format=torch.channels_last)
            if self.compile_networks:
                net.compile(**({} if self.compile_networks is True else {"mode": self.compile_networks}))

    def run_device(self) -> torch.device:
        """The device the fit runs on: the strategy's (the module may not be there yet), else the weights'."""
        if self._trainer is not None:
            return self._trainer.strategy.root_device
        return next(self.parameters()).device

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
        """The LR multiplier at optimiser step ``step``: the stage plan's schedule where it set one, else
        the configured ``lr_schedule``."""
        return (self.stage_schedule or self.lr_schedule)(step / self.steps_per_epoch)

    def on_fit_start(self) -> None:
        if self.leaves_parameters_unused:
            require_unused_parameter_search(self.trainer.strategy, type(self).__name__)

    # ---- steps -----------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        """The method's losses, summed; their values, the LR and the train accuracy go to device-side
        sums (:class:`StepStats`), read only when they are logged (no host synchronisation here)."""
        images, targets, index = batch
        terms, logits = self.training_losses(self.format_input(images), targets, index)
        stacked = torch.stack(list(terms.values()))
        loss = stacked.sum()
        n = len(targets)
        self.stats.start_epoch(self.current_epoch)
        names = self._train_names.get(tuple(terms))
        if names is None:
            names = self._train_names[tuple(terms)] = tuple(f"train/loss_{name}" for name in terms) + ("train/loss",)
        self.stats.add(names, torch.cat([stacked.detach(), loss.detach()[None]]), n, self.global_step)
        self.stats.add_lr(self.trainer.optimizers[0].param_groups[0]["lr"], n)
        if logits is not None:  # a phase without labels (SSKD's backbone phases) computes no logits
            self.stats.add_hits(logits.detach(), targets)
        return loss

    def on_after_backward(self) -> None:
        """Record whether the gradients' float32 2-norm is finite: a non-finite entry, or a norm so large
        (above about 1.8e19) that its sum of squares overflows, both count as divergence ([chosen]: the
        max-abs norm, exact for the entries alone, costs 3-7x more on a CPU). Not under a gradient
        scaler, whose scaled gradients may overflow on purpose: it skips those steps itself."""
        if self._grad_params is None:
            scaled = getattr(self.trainer.precision_plugin, "scaler", None) is not None
            self._grad_params = [] if scaled else [p for p in self.parameters() if p.requires_grad]
        grads = [p.grad for p in self._grad_params if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            self.stats.add(GRAD_NORM, norm[None], 0, self.global_step, summed=False)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        """At Lightning's logging steps: check finiteness and log this step's values as ``<name>_step``
        (the CSV/loggers) and ``<name>`` (``callback_metrics``), as ``self.log(on_step=True)`` did."""
        if not log_step_due(self.trainer):
            return
        self.raise_if_diverged()
        values = dict(zip(self.stats.last_names, self.stats.last))
        values["lr"] = torch.tensor(self.stats.lr_last)
        self.log_dict({f"{name}_step": v for name, v in values.items()}, on_step=True, on_epoch=False)
        self.log_dict(values, on_step=True, on_epoch=False, logger=False)

    def on_train_epoch_end(self) -> None:
        """Log the epoch means as ``<name>_epoch`` (and ``<name>`` in ``callback_metrics``) and the
        epoch's train top-1/top-5 over every process, after checking finiteness."""
        self.raise_if_diverged()
        means = self.stats.epoch_means()
        lr = self.stats.lr_mean()
        if lr is not None:
            means["lr"] = lr
        if means:
            self.log_dict({f"{name}_epoch": v for name, v in means.items()}, on_epoch=True, batch_size=1)
            self.log_dict(means, on_epoch=True, logger=False, batch_size=1)
        strategy = self.trainer.strategy
        accuracy = self.stats.accuracy(lambda t: strategy.reduce(t, reduce_op="sum"))
        if accuracy:
            self.log_dict({f"train/{k}": v for k, v in accuracy.items()}, on_epoch=True, batch_size=1)

    def raise_if_diverged(self) -> None:
        """Raise :class:`NonFiniteError` if any step so far had a non-finite loss term or gradient norm
        (every DDP process agrees). One device read: called where the host synchronises anyway."""
        trainer = self._trainer
        if trainer is None:  # no training step outside a Trainer
            return
        strategy = trainer.strategy
        reduce_min = (lambda t: strategy.reduce(t, reduce_op="min")) if trainer.world_size > 1 else None
        bad = self.stats.first_nonfinite(reduce_min)
        if bad is not None:
            raise NonFiniteError(divergence_message(*bad, last_checkpoint(trainer)))

    def on_validation_start(self) -> None:
        self.raise_if_diverged()  # never validate (nor select as best) weights from a diverged run

    def validation_step(self, batch, batch_idx):
        self._evaluate("val", batch)

    def test_step(self, batch, batch_idx):
        self._evaluate("test", batch)

    def _evaluate(self, split: str, batch) -> None:
        images, targets, _ = batch
        for name, logits in self.eval_logits(self.format_input(images)).items():
            for metric in self.metrics[f"{split}_{name}"].values():
                metric.update(logits, targets)  # logged (computed) once, at the epoch end

    def _log_accuracy(self, split: str) -> None:
        """Log the top-k metrics of every network evaluated in this epoch (Lightning computes and resets them)."""
        for name in self.eval_names:
            prefix = f"{split}/" if name == MAIN else f"{split}/{name}_"
            for k, metric in self.metrics[f"{split}_{name}"].items():
                if metric.update_count:
                    self.log(f"{prefix}{k}", metric, on_step=False, on_epoch=True)

    def on_test_epoch_end(self) -> None:
        self._log_accuracy("test")

    @property
    def selects_best(self) -> bool:
        """Whether this epoch's ``val/top1`` may be the run's best (``val/top1_best``, the best checkpoint)."""
        return True

    def on_validation_epoch_end(self) -> None:
        self._log_accuracy("val")
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
        """Refuse to write a checkpoint after a non-finite step, or one whose weights are not finite
        (every checkpoint a fit writes passes here: ``last``, best, preemption)."""
        self.raise_if_diverged()
        bad = nonfinite_tensors(checkpoint.get("state_dict", {}))
        if bad:
            raise NonFiniteError(
                nonfinite_weights_message(
                    f"refusing to write the checkpoint at global step {self.global_step}: its", bad
                )
            )
        checkpoint["distill_best"] = dict(self.best)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.best = dict(checkpoint.get("distill_best", {}))
