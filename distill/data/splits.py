"""Stratified, seeded splits of a training set: a held-out validation split and a training fraction.

Every DataModule with ``val_fraction`` / ``train_fraction`` arguments builds its splits here, so they
mean the same everywhere (project choices):

- Stratified: each class contributes ``round(n_class · fraction)`` images to the part taken.
- Fixed: the draw depends only on the labels and ``split_seed`` (never on the run's ``seed``), so every
  run of a study, whatever its seed, sees the same subset and the same validation images.
- Nested: one permutation per class serves every fraction, so the validation split does not depend on
  ``train_fraction``, and a smaller training fraction is a subset of a larger one.
- Disjoint: the validation images are taken first; the training fraction is drawn from the rest.
"""

from __future__ import annotations

import torch

from ..checks import fraction


def class_permutations(targets: torch.Tensor, seed: int) -> list[torch.Tensor]:
    """For every class (in sorted order), its indices in an order drawn from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    members = [(targets == cls).nonzero().flatten() for cls in targets.unique(sorted=True)]
    return [m[torch.randperm(len(m), generator=generator)] for m in members]


def stratified_split(targets: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted indices ``(rest, part)``: ``part`` holds ``round(n_class · fraction)`` images of every class."""
    rest, part = [], []
    for members in class_permutations(targets, seed):
        n = round(len(members) * fraction)
        part.append(members[:n])
        rest.append(members[n:])
    return torch.cat(rest).sort().values, torch.cat(part).sort().values


def train_val_indices(
    targets: torch.Tensor, val_fraction: float, train_fraction: float, split_seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted indices ``(train, val)`` into a training split of labels ``targets``.

    ``val`` holds ``round(n_class · val_fraction)`` images of every class (empty at 0); ``train`` holds
    ``round(m_class · train_fraction)`` of the ``m_class`` images left in every class. A class left with
    no training image, or with none held out while ``val_fraction > 0``, is an error naming it.
    """
    fraction("train_val_indices", "val_fraction", val_fraction, zero=True, one=False)
    fraction("train_val_indices", "train_fraction", train_fraction)
    classes = targets.unique(sorted=True).tolist()
    train, val = [], []
    for cls, members in zip(classes, class_permutations(targets, split_seed)):
        n_val = round(len(members) * val_fraction)
        left = members[n_val:]
        n_train = round(len(left) * train_fraction)
        if n_train == 0 or (val_fraction > 0 and n_val == 0):
            raise ValueError(
                f"val_fraction={val_fraction}, train_fraction={train_fraction}: class {cls} has {len(members)} "
                f"training images, leaving {n_val} for validation and {n_train} for training; expected at least "
                "one in each: raise the fraction"
            )
        val.append(members[:n_val])
        train.append(left[:n_train])
    return torch.cat(train).sort().values, torch.cat(val).sort().values
