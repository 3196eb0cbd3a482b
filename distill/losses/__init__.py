"""Distillation losses: one file per method, each holding its pure loss function(s) of tensors and the
:class:`DistillTerm` the offline KD engine combines (configs name terms as ``distill.losses.<Name>Term``)."""

from .at import ATTerm, at_loss, at_loss_stages, attention_map
from .crd import ContrastMemory, CRDTerm, Embed, contrast_logits, crd_loss, nce_loss
from .dkd import DKDTerm, dkd_loss
from .fitnet import ConvRegressor, FitNetTerm, fitnet_loss
from .kd import KDTerm, kd_loss
from .pkt import PKTTerm, pkt_loss
from .rkd import RKDTerm, rkd_loss
from .sp import SPTerm, sp_loss
from .term import DistillTerm

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
