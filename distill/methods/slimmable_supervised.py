"""A slimmable teacher trained at all its widths at once: the teacher side of PWKD (Zhang, Zhang, Sun, 2021,
"Partial to Whole Knowledge Distillation").

The network is converted in place by :func:`distill.models.slimmable.make_slimmable`; each training step
runs every width and sums their losses. :class:`~distill.methods.pwkd.PWKD` then distils from it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .. import checks
from ..errors import ConfigError
from ..models import create_model
from ..models.slimmable import DEFAULT_WIDTHS, check_widths, load_slimmable, make_slimmable, set_width, width_name
from .base import MAIN, DistillModule
from .card import Network, RunCard


def soft_cross_entropy(logits: torch.Tensor, target_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """τ² · cross-entropy of softmax(logits/τ) against softmax(target_logits/τ), batch mean, float32."""
    target = F.softmax(target_logits.float() / temperature, dim=1)
    return -(target * F.log_softmax(logits.float() / temperature, dim=1)).sum(1).mean() * temperature**2


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
            network: the separately trained narrow teacher of PWKD's ablation (docs/paradigms/pwkd.md#ablations).
        model_kwargs: extra constructor arguments of the architecture.
    """

    exported = {"student": Network("model.", "model", "model_kwargs")}

    @classmethod
    def card(cls, args) -> RunCard:
        """Only ever a teacher (the ``slimmable teacher`` column); a run trained at some widths only is
        named after them (``resnet56-w0_25``)."""
        parts = (args["model"], *(width_name(w) for w in args.get("train_widths") or ()))
        return RunCard("slimmablesupervised", args["model"], None, parts, None, "slimmable teacher")

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
        checks.positive("SlimmableSupervised", "inplace_temperature", inplace_temperature)
        self.widths = check_widths(widths)
        self.train_widths = self.widths if train_widths is None else tuple(sorted({float(w) for w in train_widths}))
        if not self.train_widths or not set(self.train_widths) <= set(self.widths):
            raise ConfigError(f"train_widths {list(self.train_widths)} must be some of the widths {list(self.widths)}")
        if sandwich and self.train_widths[-1] != 1.0:
            raise ConfigError("sandwich needs the whole width among train_widths (it teaches the narrower ones)")
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
