"""Batched augmentation on tensors, seeded per training step so a resumed run draws the same crops.

``random_crop_flip`` is the CIFAR protocol augmentation (zero-pad, random crop back to size,
horizontal flip) done for a whole batch at once, on whatever device the batch is on;
``random_resized_crop_boxes`` draws ImageNet's random-resized-crop boxes for a whole batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def step_generator(seed: int, step: int, device: torch.device, rank: int = 0) -> torch.Generator:
    """A generator whose stream depends only on ``(seed, step, rank)``: each DDP rank draws its own."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step + rank * 1_000_000_007) % (2**63 - 1))


def random_crop_flip(images: torch.Tensor, pad: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``pad``, crop every image back to its size at a uniform offset, flip with p=0.5.

    One gather from the flattened padded images, at indices built from broadcast per-image row and
    column offsets (the flip folded into the columns); the draws are rows, columns, then flips.
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
    index = (rows[:, :, None] * images.shape[3] + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return images.flatten(2).gather(2, index).view(n, c, h, w)


def random_resized_crop_boxes(
    sizes: torch.Tensor,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    tries: int = 10,
) -> torch.Tensor:
    """Crop boxes ``(top, left, height, width)`` of ``RandomResizedCrop`` for images of ``sizes`` ``(N, 2)`` (h, w).

    torchvision's rule drawn for the whole batch at once: up to ``tries`` (area fraction, log aspect
    ratio) draws per image, the first that fits wins; an image with none falls back to the centred
    crop of the largest size whose aspect ratio is within ``ratio``.
    """
    n = len(sizes)
    height, width = sizes[:, 0:1].double(), sizes[:, 1:2].double()
    area = height * width * torch.empty(n, tries, dtype=torch.float64).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(n, tries, dtype=torch.float64).uniform_(
        math.log(ratio[0]), math.log(ratio[1]), generator=generator
    )
    w = torch.sqrt(area * log_ratio.exp()).round()
    h = torch.sqrt(area / log_ratio.exp()).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.long().argmax(1, keepdim=True)  # the first try that fits (0 when none does)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    height, width = height.squeeze(1), width.squeeze(1)
    u = torch.rand(n, 2, dtype=torch.float64, generator=generator)
    top, left = (u[:, 0] * (height - h + 1)).floor(), (u[:, 1] * (width - w + 1)).floor()

    aspect = width / height
    fallback_w = torch.where(aspect > ratio[1], (height * ratio[1]).round(), width)
    fallback_h = torch.where(aspect < ratio[0], (width / ratio[0]).round(), height)
    none_fit = ~fits.any(1)
    w, h = torch.where(none_fit, fallback_w, w), torch.where(none_fit, fallback_h, h)
    top = torch.where(none_fit, torch.div(height - h, 2, rounding_mode="floor"), top)
    left = torch.where(none_fit, torch.div(width - w, 2, rounding_mode="floor"), left)
    return torch.stack([top, left, h, w], 1).long()
