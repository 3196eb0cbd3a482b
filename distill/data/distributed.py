"""Samplers that share out a data split among DDP processes, and a training loader that resumes mid-epoch.

- :class:`EpochShardSampler` (training): the epoch's permutation depends only on ``(seed, epoch)``;
  it is padded to a multiple of the world size, so every rank runs the same number of steps (as DDP
  needs), and dealt out round robin, as ``DistributedSampler`` does. With one process it is the
  plain permutation.
- :class:`EvalShardSampler` (validation, test): rank ``r`` takes samples ``r, r + W, r + 2W, ...``
  and nothing is padded, so every sample is evaluated exactly once (ranks may differ by one
  sample). The torchmetrics metrics add up their counts over the ranks at the end of the epoch.
- :class:`ResumableLoader`: Lightning saves its state (epoch, batches consumed) in every checkpoint
  and restores it before the resumed run draws its first batch, so a checkpoint written in the
  middle of an epoch continues with the next batch of the same permutation.

Both samplers subclass ``DistributedSampler``, so Lightning keeps them instead of injecting its own
(``Trainer(use_distributed_sampler=True)``, the default, replaces only other samplers).
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, DistributedSampler


class EpochShardSampler(DistributedSampler):
    """This rank's share of a permutation that depends only on ``(seed, epoch)``, padded to equal shares."""

    def __init__(self, length: int, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        super().__init__(range(length), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0  # samples of this rank's share to skip in the next iteration (a resumed epoch)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start = 0
        super().set_epoch(epoch)

    def resume(self, epoch: int, start: int) -> None:
        """Continue ``epoch`` after the first ``start`` samples of this rank's share."""
        self.epoch, self.start = epoch, start

    def __iter__(self):
        length = len(self.dataset)
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(length, generator=generator).tolist()
        padding = self.total_size - length
        order += (order * math.ceil(padding / max(length, 1)))[:padding]
        share = order[self.rank : self.total_size : self.num_replicas]
        start, self.start = self.start, 0
        return iter(share[start:])


class EvalShardSampler(DistributedSampler):
    """Samples ``rank, rank + num_replicas, ...`` in order: disjoint shares that cover the split once."""

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0):
        super().__init__(range(length), num_replicas=num_replicas, rank=rank, shuffle=False)
        self.num_samples = len(range(rank, length, num_replicas))

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))


def split_sampler(length: int, train: bool, seed: int, trainer=None) -> DistributedSampler:
    """The sampler of a split for this process: the trainer's world size and global rank, else one process."""
    world, rank = getattr(trainer, "world_size", 1), getattr(trainer, "global_rank", 0)
    return EpochShardSampler(length, seed, world, rank) if train else EvalShardSampler(length, world, rank)


class ResumableLoader(DataLoader):
    """A training DataLoader over an :class:`EpochShardSampler` whose position Lightning checkpoints.

    Lightning calls ``state_dict`` when it writes a checkpoint and ``load_state_dict`` before the
    resumed fit creates its iterator; the iterator is a generator, so the sampler is read only at the
    first batch, after Lightning's ``set_epoch`` (with worker processes too). With another sampler
    (Lightning swaps in a sequential one for ``overfit_batches``) it is a plain DataLoader.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._epoch, self._batches = 0, 0  # the epoch being iterated and its batches handed out so far

    @property
    def resumable(self) -> bool:
        return isinstance(self.sampler, EpochShardSampler)

    def __iter__(self):
        if self.resumable:
            self._epoch, self._batches = self.sampler.epoch, self.sampler.start // self.batch_size
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        if not self.resumable:
            return {}
        epoch = self.sampler.epoch
        return {"epoch": epoch, "batches": self._batches if epoch == self._epoch else 0}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state and self.resumable:
            self.sampler.resume(state["epoch"], state["batches"] * self.batch_size)
