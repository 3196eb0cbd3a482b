"""Training statistics kept on the device, so a training step never waits for it.

Every step adds its weighted loss terms, the total loss and the main network's top-1/top-5 hits to
running sums on the device, and records, per name, the first step at which the value was not
finite. Nothing is copied to the host until a point that reads it anyway: a logging step (every
``log_every_n_steps``), the epoch end, a validation or a checkpoint. [chosen] This replaces a
``self.log`` per term and a torchmetrics update per step, each of which costs host time (and, on a
GPU, an accuracy metric's argument checks synchronise); the logged names and values are Lightning's
(see :class:`~distill.methods.base.DistillModule`).

The epoch sums are Lightning's arithmetic: ``Σ value · batch_size`` in float32 and a division by the
number of samples, so ``train/*_epoch`` is the exact sample-weighted mean over the epoch's batches.
"""

from __future__ import annotations

import numpy as np
import torch

NEVER = torch.iinfo(torch.int64).max  # "first non-finite step" of a name that has always been finite


class StepStats:
    """Running sums of named per-step values and top-k hits, and the first non-finite step of every name."""

    def __init__(self):
        self.names: list[str] = []  # every name seen, in order of first appearance
        self.index: dict[str, int] = {}
        self.samples: list[int] = []  # per name: samples summed into it this epoch (host side)
        self.sums: torch.Tensor | None = None  # per name: Σ value · batch_size this epoch (float32)
        self.first_bad: torch.Tensor | None = None  # per name: first step with a non-finite value (int64)
        self.last: torch.Tensor | None = None  # the values of the latest step, in the order of last_names
        self.last_names: tuple[str, ...] = ()
        self.lr_sum, self.lr_samples, self.lr_last = np.float32(0), 0, 0.0
        self.hits: torch.Tensor | None = None  # top-1 and top-5 hits of the main network this epoch
        self.hit_samples = 0
        self.epoch: int | None = None
        self._positions: dict[tuple[str, ...], torch.Tensor] = {}

    # ---- per step: no host synchronisation ------------------------------------------------------
    def _positions_of(self, names: tuple[str, ...], device: torch.device) -> torch.Tensor:
        positions = self._positions.get(names)
        if positions is None or positions.device != device:
            new = [n for n in names if n not in self.index]
            for name in new:
                self.index[name] = len(self.names)
                self.names.append(name)
                self.samples.append(0)
            if new or self.sums is None or self.sums.device != device:
                self._grow(len(self.names), device)
            positions = torch.tensor([self.index[n] for n in names], device=device)
            self._positions[names] = positions
        return positions

    def _grow(self, size: int, device: torch.device) -> None:
        sums = torch.zeros(size, device=device)
        first_bad = torch.full((size,), NEVER, dtype=torch.int64, device=device)
        if self.sums is not None:
            sums[: len(self.sums)] = self.sums.to(device)
            first_bad[: len(self.first_bad)] = self.first_bad.to(device)
        self.sums, self.first_bad = sums, first_bad

    def add(
        self, names: tuple[str, ...], values: torch.Tensor, batch_size: int, step: int, summed: bool = True
    ) -> None:
        """Add one step's ``values`` (a detached vector, one per name): to the epoch sums (weighted by
        ``batch_size``) when ``summed``, and to the finiteness record of ``step`` in any case."""
        stacked = values.float()
        positions = self._positions_of(names, stacked.device)
        bad_at = torch.where(torch.isfinite(stacked), NEVER, step)
        self.first_bad.scatter_reduce_(0, positions, bad_at, reduce="amin")
        if summed:
            self.sums.index_add_(0, positions, stacked * batch_size)
            for name in names:
                self.samples[self.index[name]] += batch_size
            self.last, self.last_names = stacked, names

    def add_lr(self, lr: float, batch_size: int) -> None:
        """The step's learning rate (a host value), summed as Lightning sums a float32 metric."""
        self.lr_last = lr
        self.lr_sum = np.float32(self.lr_sum + np.float32(lr) * np.float32(batch_size))
        self.lr_samples += batch_size

    def add_hits(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Top-1 (``argmax``) and top-5 (``topk``) hits, micro-averaged: torchmetrics' definitions."""
        top1 = logits.argmax(1) == targets
        k = min(5, logits.shape[1])
        topk = (logits.topk(k, 1).indices == targets[:, None]).any(1)
        hits = torch.stack([top1, topk]).sum(1)
        self.hits = hits if self.hits is None else self.hits + hits
        self.hit_samples += len(targets)

    def start_epoch(self, epoch: int) -> None:
        """Clear the epoch sums (not the finiteness record) when ``epoch`` is a new one."""
        if epoch == self.epoch:
            return
        self.epoch = epoch
        if self.sums is not None:
            self.sums.zero_()
        self.samples = [0] * len(self.names)
        self.lr_sum, self.lr_samples = np.float32(0), 0
        self.hits, self.hit_samples = None, 0

    # ---- read where the host synchronises anyway -----------------------------------------------
    def first_nonfinite(self, reduce_min=None) -> tuple[int, list[str]] | None:
        """``(step, names)`` of the first step with a non-finite value, or ``None`` (one device read).

        ``reduce_min`` combines the record of every DDP process (an all-reduce with ``min``)."""
        if self.first_bad is None:
            return None
        first_bad = (self.first_bad if reduce_min is None else reduce_min(self.first_bad.clone())).tolist()
        step = min(first_bad)
        if step == NEVER:
            return None
        return step, [name for name, at in zip(self.names, first_bad) if at == step]

    def epoch_means(self) -> dict[str, torch.Tensor]:
        """The sample-weighted epoch mean of every name summed this epoch (device tensors)."""
        return {name: self.sums[i] / self.samples[i] for i, name in enumerate(self.names) if self.samples[i]}

    def lr_mean(self) -> torch.Tensor | None:
        """The sample-weighted epoch mean of the learning rate, a float32 tensor (``None`` before any step)."""
        return torch.tensor(self.lr_sum / np.float32(self.lr_samples)) if self.lr_samples else None

    def accuracy(self, reduce_sum=None) -> dict[str, torch.Tensor]:
        """Top-1/top-5 of the epoch (fractions), over every DDP process when ``reduce_sum`` all-reduces."""
        if self.hits is None:
            return {}
        counts = torch.cat([self.hits, self.hits.new_tensor([self.hit_samples])])
        if reduce_sum is not None:
            counts = reduce_sum(counts)
        top1, top5, samples = counts.float()
        return {"top1": top1 / samples, "top5": top5 / samples}
