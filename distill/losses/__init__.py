"""Distillation losses: one file per method, each holding its pure loss function(s) of tensors and the
:class:`DistillTerm` the offline KD engine combines (configs name terms as ``distill.losses.<Name>Term``).
AB, FT and FSP have no term yet: their pure pieces serve an initialisation phase."""

from .ab import ab_loss
from .at import ATTerm, at_loss, at_loss_stages, attention_map
from .cc import CCTerm, cc_loss
from .crd import ContrastMemory, CRDTerm, Embed, contrast_logits, crd_loss, nce_loss
from .dist import DISTTerm, dist_loss
from .dkd import DKDTerm, dkd_loss
from .fitnet import ConvRegressor, FitNetTerm, fitnet_loss
from .fsp import fsp_loss, fsp_matrix
from .ft import Paraphraser, Translator, ft_loss
from .kd import KDTerm, kd_loss, standardize_logits
from .kdsvd import KDSVDTerm, kdsvd_loss
from .nst import NSTTerm, nst_loss
from .ofd import OFDConnector, OFDTerm, ofd_loss, ofd_margin
from .pkt import PKTTerm, pkt_loss
from .reviewkd import ABF, ReviewKDTerm, hcl_loss
from .rkd import RKDTerm, rkd_loss
from .sp import SPTerm, sp_loss
from .term import DistillTerm
from .vid import VIDRegressor, VIDTerm, vid_loss

__all__ = [
    "ABF",
    "ATTerm",
    "CCTerm",
    "CRDTerm",
    "ContrastMemory",
    "ConvRegressor",
    "DISTTerm",
    "DKDTerm",
    "DistillTerm",
    "Embed",
    "FitNetTerm",
    "KDSVDTerm",
    "KDTerm",
    "NSTTerm",
    "OFDConnector",
    "OFDTerm",
    "PKTTerm",
    "Paraphraser",
    "RKDTerm",
    "ReviewKDTerm",
    "SPTerm",
    "Translator",
    "VIDRegressor",
    "VIDTerm",
    "ab_loss",
    "at_loss",
    "at_loss_stages",
    "attention_map",
    "cc_loss",
    "contrast_logits",
    "crd_loss",
    "dist_loss",
    "dkd_loss",
    "fitnet_loss",
    "fsp_loss",
    "fsp_matrix",
    "ft_loss",
    "hcl_loss",
    "kd_loss",
    "kdsvd_loss",
    "nce_loss",
    "nst_loss",
    "ofd_loss",
    "ofd_margin",
    "pkt_loss",
    "rkd_loss",
    "sp_loss",
    "standardize_logits",
    "vid_loss",
]
