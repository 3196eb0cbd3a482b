"""Plain cross-entropy training of one zoo model: teachers and from-scratch students."""

from __future__ import annotations

import torch.nn.functional as F

from ..models import create_model, load_weights
from .base import DistillModule


class Supervised(DistillModule):
    """Train ``model`` (a zoo name) with cross-entropy.

    Args:
        model: zoo architecture name (``distill.models.list_models()``).
        model_kwargs: extra constructor arguments of the architecture.
        weights: optional checkpoint or state_dict to start from.
    """

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
