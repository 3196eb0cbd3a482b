"""Plain cross-entropy training of one zoo model: teachers and from-scratch students."""

from __future__ import annotations

import torch.nn.functional as F

from ..models import create_model, load_weights
from .base import DistillModule
from .card import Network, RunCard


class Supervised(DistillModule):
    """Train ``model`` (a zoo name) with cross-entropy.

    Args:
        model: zoo architecture name (``distill.models.list_models()``).
        model_kwargs: extra constructor arguments of the architecture.
        weights: optional checkpoint or state_dict to start from.
    """

    exported = {"student": Network("model.", "model", "model_kwargs")}

    @classmethod
    def card(cls, args) -> RunCard:
        """A from-scratch run fills the ``student`` column of the pairs it is the student of and the
        ``teacher`` column of those it is the teacher of."""
        return RunCard("supervised", args["model"], None, (args["model"],), "student", "teacher")

    def __init__(self, model: str = "resnet56", model_kwargs: dict | None = None, weights: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.model = create_model(model, num_classes=self.num_classes, in_chans=self.in_chans, **(model_kwargs or {}))
        if weights:
            load_weights(self.model, weights)

    def forward(self, images):
        return self.model(images)

    def training_losses(self, images, targets, index):
        logits = self.model(images)
        return {"ce": F.cross_entropy(logits, targets)}, logits
