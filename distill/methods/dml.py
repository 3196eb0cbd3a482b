"""Deep Mutual Learning (Zhang et al., 2018): two networks from scratch teach each other online.

Each network minimises ``ce_weight · CE + kl_weight · τ² KL(p_other ‖ p_self)`` with the partner's
prediction detached (docs/methods/offline.md#dml); one optimiser over both networks, which is equivalent to the
paper's alternating updates up to the order within a step.
"""

from __future__ import annotations

import torch.nn.functional as F

from .. import checks
from ..losses.kd import kd_loss
from ..models import create_model
from .base import MAIN, DistillModule
from .card import Network, RunCard


class DML(DistillModule):
    """Args:
    student: zoo name of the first network (the one reported as ``val/top1``).
    peer: zoo name of the second network (reported as ``val/peer_top1``); default: same as ``student``.
    temperature: softmax temperature of the mutual KL (1 in the paper).
    ce_weight: weight of each network's cross-entropy.
    kl_weight: weight of each network's KL to its partner.
    """

    eval_names = (MAIN, "peer")
    exported = {"student": Network("student.", "student"), "peer": Network("peer.", "peer")}

    @classmethod
    def card(cls, args) -> RunCard:
        """Teacher-less: fills the ``dml`` column of every pair whose student is its first network."""
        student = args["student"]
        return RunCard("dml", student, None, (student, args.get("peer") or student), "dml")

    def __init__(
        self,
        student: str = "resnet32",
        peer: str | None = None,
        temperature: float = 1.0,
        ce_weight: float = 1.0,
        kl_weight: float = 1.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        checks.positive("DML", "temperature", temperature)
        checks.non_negative("DML", "ce_weight", ce_weight)
        checks.non_negative("DML", "kl_weight", kl_weight)
        self.save_hyperparameters()
        self.temperature, self.ce_weight, self.kl_weight = temperature, ce_weight, kl_weight
        self.student = create_model(student, num_classes=self.num_classes, in_chans=self.in_chans)
        self.peer = create_model(peer or student, num_classes=self.num_classes, in_chans=self.in_chans)

    def forward(self, images):
        return self.student(images)

    def eval_logits(self, images):
        return {MAIN: self.student(images), "peer": self.peer(images)}

    def training_losses(self, images, targets, index):
        a, b = self.student(images), self.peer(images)
        losses = {
            "ce": self.ce_weight * F.cross_entropy(a.float(), targets),
            "peer_ce": self.ce_weight * F.cross_entropy(b.float(), targets),
            "kl": self.kl_weight * kd_loss(a, b.detach(), self.temperature),
            "peer_kl": self.kl_weight * kd_loss(b, a.detach(), self.temperature),
        }
        return losses, a
