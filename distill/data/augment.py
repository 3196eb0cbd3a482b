"""Batched augmentation on tensors, seeded per training step so a resumed run draws the same crops.

``random_crop_flip`` is the CIFAR protocol augmentation (zero-pad, random crop back to size,
horizontal flip) done for a whole batch at once, on whatever device the batch is on.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """A generator whose stream depends only on ``(seed, step)``."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) % (2**63 - 1))


def random_crop_flip(images: torch.Tensor, pad: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``pad``, crop every image back to its size at a uniform offset, flip with p=0.5.

    Two gathers (rows, then columns with the flip folded in) over broadcast, not materialised, indices.
    """
    n, c, h, w = images.shape
    device = images.device
    rows = torch.arange(h, device=device).expand(n, h)
    cols = torch.arange(w, device=device).expand(n, w)
    if pad:
        images = F.pad(images, (pad, pad, pad, pad))
        rows = rows + torch.randint(0, 2 * pad + 1, (n,), device=device, generator=generator)[:, None]
        cols = cols + torch.randint(0, 2 * pad + 1, (n,), device=device, generator=generator)[:, None]
    if flip:
        mask = torch.rand(n, device=device, generator=generator) < 0.5
        cols = torch.where(mask[:, None], cols.flip(-1), cols)
    images = images.gather(2, rows[:, None, :, None].expand(n, c, h, images.shape[3]))
    return images.gather(3, cols[:, None, None, :].expand(n, c, h, w))
