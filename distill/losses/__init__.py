"""Distillation losses: pure functions of tensors, and the terms the offline KD engine combines."""

from .at import at_loss, at_loss_stages, attention_map
from .crd import ContrastMemory, Embed, contrast_logits, crd_loss, nce_loss
from .dkd import dkd_loss
from .fitnet import ConvRegressor, fitnet_loss
from .kd import kd_loss
from .pkt import pkt_loss
from .rkd import rkd_loss
from .sp import sp_loss
from .term import DistillTerm
from .terms import ATTerm, CRDTerm, DKDTerm, FitNetTerm, KDTerm, PKTTerm, RKDTerm, SPTerm

__all__ = [
    "ATTerm",
    "CRDTerm",
    "ContrastMemory",
    "ConvRegressor",
    "DKDTerm",
    "DistillTerm",
    "Embed",
    "FitNetTerm",
    "KDTerm",
    "PKTTerm",
    "RKDTerm",
    "SPTerm",
    "at_loss",
    "at_loss_stages",
    "attention_map",
    "contrast_logits",
    "crd_loss",
    "dkd_loss",
    "fitnet_loss",
    "kd_loss",
    "nce_loss",
    "pkt_loss",
    "rkd_loss",
    "sp_loss",
]
