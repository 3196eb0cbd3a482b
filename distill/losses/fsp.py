"""FSP: flow of solution procedure (Yim et al., CVPR 2017, "A Gift from Knowledge Distillation").

Only the loss: the CRD benchmark trains the student's backbone on it in an initialisation phase
and adds no FSP term afterwards; that phase belongs to the stage mechanism, not to a term.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .maps import pool_to_smaller


def fsp_matrix(bottom: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """G[b, j, i] = mean over positions of top[b, j] · bottom[b, i]: the (B, C_top, C_bottom) flow
    between two maps, the larger one first adaptive-average-pooled to the other's size."""
    bottom, top = pool_to_smaller(bottom, top)
    return torch.bmm(top.flatten(2), bottom.flatten(2).transpose(1, 2)) / bottom[0, 0].numel()


def fsp_loss(stages_s: Sequence[torch.Tensor], stages_t: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ over consecutive pairs (k, k + 1) of mean((G_s − G_t)²) of the FSP matrices.

    As the CRD benchmark's ``FSP`` (which feeds it the stem output and every stage output): student
    and teacher need the same channel counts at every map. Float32 (autocast off), teacher detached.
    """
    if len(stages_s) != len(stages_t) or len(stages_s) < 2:
        raise ValueError(
            f"FSP needs as many student as teacher maps (at least 2), got {len(stages_s)} and {len(stages_t)}"
        )
    channels_s, channels_t = [f.shape[1] for f in stages_s], [f.shape[1] for f in stages_t]
    if channels_s != channels_t:
        raise ValueError(f"FSP needs equal channel counts, got {channels_s} (student) and {channels_t} (teacher)")
    with torch.autocast(stages_s[0].device.type, enabled=False):
        s = [f.float() for f in stages_s]
        t = [f.detach().float() for f in stages_t]
        return sum((fsp_matrix(s[k], s[k + 1]) - fsp_matrix(t[k], t[k + 1])).pow(2).mean() for k in range(len(s) - 1))
