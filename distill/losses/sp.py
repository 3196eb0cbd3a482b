"""SP: similarity-preserving distillation (Tung & Mori, 2019)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def similarity_matrix(f: torch.Tensor) -> torch.Tensor:
    """G = row-L2-normalised F·Fᵀ over the batch, F the flattened feature (B, ·)."""
    flat = f.flatten(1)
    return F.normalize(flat @ flat.t(), dim=1)


def sp_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """‖G_t − G_s‖²_F / B². Float32 (autocast off for the Gram products), teacher detached."""
    with torch.autocast(f_s.device.type, enabled=False):
        g_s = similarity_matrix(f_s.float())
        g_t = similarity_matrix(f_t.detach().float())
        return (g_t - g_s).pow(2).sum() / f_s.shape[0] ** 2
