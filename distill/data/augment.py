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
    """Zero-pad by ``pad``, crop every image back to its size at a uniform offset, flip with p=0.5."""
    n, _, h, w = images.shape
    device = images.device
    if pad:
        padded = F.pad(images, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), device=device, generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (n,), device=device, generator=generator)
        rows = (dy[:, None] + torch.arange(h, device=device)[None, :])[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=device)[None, :])[:, None, None, :]
        batch = torch.arange(n, device=device)[:, None, None, None]
        chans = torch.arange(images.shape[1], device=device)[None, :, None, None]
        images = padded[batch, chans, rows, cols]
    if flip:
        mask = torch.rand(n, device=device, generator=generator) < 0.5
        images = torch.where(mask[:, None, None, None], images.flip(-1), images)
    return images
