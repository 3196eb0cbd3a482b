"""Helpers shared by the feature-map losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pool_to_smaller(f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive-average-pool the larger of two (B, C, H, W) maps to the other's size, as the CRD
    benchmark does before comparing maps of different resolution (per axis: min(H), min(W))."""
    size = tuple(min(s, t) for s, t in zip(f_s.shape[-2:], f_t.shape[-2:]))
    if f_s.shape[-2:] != size:
        f_s = F.adaptive_avg_pool2d(f_s, size)
    if f_t.shape[-2:] != size:
        f_t = F.adaptive_avg_pool2d(f_t, size)
    return f_s, f_t


def paired_last(student: list, teacher: list) -> tuple[list, list]:
    """The last min(n_s, n_t) entries of each list, paired in order. [chosen] Networks with different
    stage counts pair their deepest stages (as :class:`~distill.losses.ATTerm` and mdistiller's
    ``_align_list``); for VGG, whose first stage is the CRD benchmark's stem-level ``f0``, this also
    pairs that stage, which the benchmark leaves out."""
    n = min(len(student), len(teacher))
    return list(student[len(student) - n :]), list(teacher[len(teacher) - n :])
