"""CRD: contrastive representation distillation (Tian et al., 2020).

Student and teacher embeddings (linear → 128-d → L2 norm) are contrasted against momentum memory
banks of past embeddings: the teacher anchor against the student bank and the student anchor
against the teacher bank, each with one positive (the sample's own row) and K = 16384 negatives,
scored by the NCE loss of the official code (RepDistiller ``crd/``), NCE temperature 0.07,
memory momentum 0.5.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import checks
from ..models.staged import StagedOutput
from .term import DistillTerm


# ---- pure functions ----------------------------------------------------------------------------
def contrast_logits(anchor: torch.Tensor, memory: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """⟨memory[idx[b, k]], anchor[b]⟩ as a (B, K + 1) tensor.

    [chosen] When the batch draws more rows than the bank holds (CIFAR: 64 × 16385 > 50000), all
    N scores are computed by one matmul and gathered, which moves far less memory than gathering
    B·(K + 1) rows of D floats; the result is the same.
    """
    if idx.numel() > memory.shape[0]:
        return torch.gather(anchor @ memory.t(), 1, idx)
    return torch.bmm(memory[idx], anchor.unsqueeze(2)).squeeze(2)


def nce_loss(probs: torch.Tensor, n_data: int, eps: float = 1e-7) -> torch.Tensor:
    """NCE loss of CRD (Eq. 18 of the paper, as the official ``ContrastLoss``).

    ``probs`` (B, K + 1) holds the normalised scores, positive first; the noise distribution is
    uniform over the ``n_data`` samples. Summed over pairs, averaged over the batch.
    """
    k = probs.shape[1] - 1
    noise = k / n_data
    log_d1 = torch.log(probs[:, 0] / (probs[:, 0] + noise + eps))
    log_d0 = torch.log(noise / (probs[:, 1:] + noise + eps))
    return -(log_d1.sum() + log_d0.sum()) / probs.shape[0]


def crd_loss(
    e_s: torch.Tensor,
    e_t: torch.Tensor,
    memory_s: torch.Tensor,
    memory_t: torch.Tensor,
    idx: torch.Tensor,
    z_s: float,
    z_t: float,
    temperature: float = 0.07,
) -> torch.Tensor:
    """Symmetric CRD loss: NCE(student anchor vs teacher bank) + NCE(teacher anchor vs student bank).

    ``e_s``/``e_t``: (B, D) L2-normalised embeddings; ``memory_s``/``memory_t``: (N, D) banks (read
    without grad); ``idx``: (B, K + 1) bank rows, the positive first; ``z_s``/``z_t``: the
    normalisation constants of the student-/teacher-anchored scores. Float32 (autocast off).
    """
    with torch.autocast(e_s.device.type, enabled=False):
        e_s, e_t = e_s.float(), e_t.float()
        p_s = torch.exp(contrast_logits(e_s, memory_t.detach().float(), idx) / temperature) / z_s
        p_t = torch.exp(contrast_logits(e_t, memory_s.detach().float(), idx) / temperature) / z_t
        n_data = memory_s.shape[0]
        return nce_loss(p_s, n_data) + nce_loss(p_t, n_data)


# ---- distributed helpers -----------------------------------------------------------------------
def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` (no grad) from every rank along dim 0, ranks in order; sizes may differ.
    The identity when not distributed."""
    if not _distributed():
        return t
    world = dist.get_world_size()
    size = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    padded = t.new_zeros((max(sizes), *t.shape[1:]))
    padded[: t.shape[0]] = t
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([g[:n] for g, n in zip(gathered, sizes)])


def mean_across_ranks(x: torch.Tensor) -> torch.Tensor:
    """Mean of a scalar over ranks; the identity when not distributed."""
    if not _distributed():
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


# ---- connectors --------------------------------------------------------------------------------
class Embed(nn.Module):
    """Linear projection of a pooled feature to ``dim`` (128) followed by L2 normalisation (float32)."""

    def __init__(self, dim_in: int, dim: int = 128):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.flatten(1)).float(), dim=1)


class ContrastMemory(nn.Module):
    """The two momentum memory banks (student, teacher) of CRD, one row per training sample.

    Sized by :meth:`setup` from the training labels. After the loss is computed, each bank's rows
    at the batch's indices become ``normalise(m · row + (1 − m) · embedding)`` (the official rule).

    Project choices:

    - **Negatives**: the official ``exact`` mode: K negatives per sample drawn uniformly from the
      samples of *other* classes; [chosen] drawn with replacement (i.i.d. noise samples, as NCE
      assumes), vectorised on the bank's device.
    - **Reproducibility**: a ``torch.Generator`` on the bank's device, reseeded every training step
      from (seed, rank, step); the step counter is checkpointed, so a resumed run draws the same
      negatives. The initial banks come from a CPU generator seeded by ``seed`` (identical on every
      rank).
    - **DDP**: the banks are plain tensors, not buffers (DDP would broadcast rank 0's buffers every
      step), persisted through :meth:`get_extra_state`; every rank applies the same update from the
      all-gathered (embeddings, indices). Duplicate indices in one update keep the last occurrence,
      so the result is deterministic. The normalisation constants Z (set on the first step, as
      the official code) are averaged over ranks.
    - Only training-mode forwards update the banks and advance the step.
    """

    def __init__(
        self,
        dim: int = 128,
        num_negatives: int = 16384,
        temperature: float = 0.07,
        momentum: float = 0.5,
        seed: int = 0,
    ):
        super().__init__()
        self.dim, self.num_negatives, self.temperature, self.momentum, self.seed = (
            dim,
            num_negatives,
            temperature,
            momentum,
            seed,
        )
        self.memory_s: torch.Tensor | None = None
        self.memory_t: torch.Tensor | None = None
        self.z_s: float | None = None
        self.z_t: float | None = None
        self.step = 0
        # labels indexed by class, set by setup(); not checkpointed (setup runs before a restore)
        self.targets = self.order = self.counts = self.starts = None
        self._generator: torch.Generator | None = None

    # -- sizing and persistence
    def setup(self, targets: torch.Tensor) -> None:
        """Index the labels by class for negative sampling; create the banks unless already sized."""
        targets = torch.as_tensor(targets, dtype=torch.long).flatten().cpu()
        self.targets = targets
        self.order = torch.argsort(targets, stable=True)  # sample indices grouped by class
        self.counts = torch.bincount(targets)
        self.starts = torch.cumsum(self.counts, 0) - self.counts
        if self.memory_s is None or self.memory_s.shape[0] != len(targets):
            gen = torch.Generator().manual_seed(self.seed)
            self.memory_s = self._uniform_bank(len(targets), gen)
            self.memory_t = self._uniform_bank(len(targets), gen)

    def _uniform_bank(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """The official initial bank: uniform in ±1/sqrt(dim/3), drawn on the CPU (identical on every rank)."""
        stdv = 1.0 / math.sqrt(self.dim / 3)
        return torch.rand(n, self.dim, generator=generator) * (2 * stdv) - stdv

    def reset_teacher(self, seed: int) -> None:
        """A fresh teacher bank drawn with ``seed``; the normalisation constants are re-estimated on
        the next step (PWKD's stage boundaries)."""
        if self.memory_t is None:
            return
        fresh = self._uniform_bank(self.memory_t.shape[0], torch.Generator().manual_seed(seed))
        self.memory_t = fresh.to(self.memory_t.device)
        self.z_s = self.z_t = None

    def get_extra_state(self) -> dict:
        return {
            "memory_s": self.memory_s,
            "memory_t": self.memory_t,
            "z_s": self.z_s,
            "z_t": self.z_t,
            "step": self.step,
        }

    def set_extra_state(self, state: dict) -> None:
        self.memory_s, self.memory_t = (
            None if m is None else m.detach().clone() for m in (state["memory_s"], state["memory_t"])
        )
        self.z_s, self.z_t, self.step = state["z_s"], state["z_t"], state["step"]

    def _move_to(self, device: torch.device) -> None:
        if self.memory_s.device != device:
            self.memory_s, self.memory_t = self.memory_s.to(device), self.memory_t.to(device)
        if self.order.device != device:
            self.targets, self.order = self.targets.to(device), self.order.to(device)
            self.counts, self.starts = self.counts.to(device), self.starts.to(device)
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)

    # -- sampling and update
    def sample(self, index: torch.Tensor) -> torch.Tensor:
        """(B, K + 1) bank rows: the sample itself, then K samples of other classes."""
        rank = dist.get_rank() if _distributed() else 0
        self._generator.manual_seed(((self.seed * 1_000_003 + rank) * 2**32 + self.step) % 2**63)
        cls = self.targets[index]
        start, count = self.starts[cls].unsqueeze(1), self.counts[cls].unsqueeze(1)
        u = torch.rand(
            len(index), self.num_negatives, generator=self._generator, device=index.device, dtype=torch.float64
        )
        pos = (u * (len(self.targets) - count)).long()  # position among the other classes' samples
        pos = pos + (pos >= start) * count  # skip the sample's own class block
        return torch.cat([index.unsqueeze(1), self.order[pos]], dim=1)

    @torch.no_grad()
    def update(self, e_s: torch.Tensor, e_t: torch.Tensor, index: torch.Tensor) -> None:
        """Momentum update of both banks with the embeddings of every rank."""
        e = all_gather_cat(torch.cat([e_s, e_t], dim=1).detach().float())
        index = all_gather_cat(index)
        uniq, inverse = torch.unique(index, return_inverse=True)
        last = torch.full_like(uniq, -1).scatter_reduce_(
            0, inverse, torch.arange(len(index), device=index.device), "amax"
        )
        e_s, e_t = e[last].split(e_s.shape[1], dim=1)
        # out of place: the loss's autograd graph may hold the old bank (the matmul path)
        self.memory_s = self._momentum(self.memory_s, uniq, e_s)
        self.memory_t = self._momentum(self.memory_t, uniq, e_t)

    def _momentum(self, memory: torch.Tensor, index: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        rows = memory[index] * self.momentum + new * (1 - self.momentum)
        return memory.index_copy(0, index, F.normalize(rows, dim=1))

    @torch.no_grad()
    def _normaliser(self, anchor: torch.Tensor, memory: torch.Tensor, idx: torch.Tensor) -> float:
        """Z = mean score of the first batch × N (official), averaged over ranks."""
        with torch.autocast(anchor.device.type, enabled=False):
            score = torch.exp(contrast_logits(anchor.float(), memory, idx) / self.temperature).mean()
        return float(mean_across_ranks(score)) * memory.shape[0]

    def forward(self, e_s: torch.Tensor, e_t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if self.targets is None or self.memory_s is None:
            raise RuntimeError("CRD needs setup_data(targets) (the training labels) before its first step")
        self._move_to(e_s.device)
        index = index.to(e_s.device).long()
        idx = self.sample(index)
        if self.z_s is None:
            self.z_s = self._normaliser(e_s, self.memory_t, idx)
            self.z_t = self._normaliser(e_t, self.memory_s, idx)
        loss = crd_loss(e_s, e_t, self.memory_s, self.memory_t, idx, self.z_s, self.z_t, self.temperature)
        if self.training:
            self.update(e_s, e_t, index)
            self.step += 1
        return loss


class CRDTerm(DistillTerm):
    """Contrastive representation distillation on the pooled embeddings (Tian et al., 2020).

    Needs :meth:`setup_data` (the training labels, for the memory and the other-class negatives)
    and the per-sample dataset ``index`` in :meth:`forward`. See :class:`ContrastMemory` for the
    memory's project choices (sampling, DDP, checkpointing).
    """

    name = "crd"
    reads_teacher = frozenset({"embedding"})

    def __init__(
        self,
        weight: float = 0.8,
        feat_dim: int = 128,
        num_negatives: int = 16384,
        nce_temperature: float = 0.07,
        momentum: float = 0.5,
        seed: int = 0,
    ):
        super().__init__(weight)
        checks.positive_int("CRDTerm", "feat_dim", feat_dim)
        checks.positive_int("CRDTerm", "num_negatives", num_negatives)
        checks.positive("CRDTerm", "nce_temperature", nce_temperature)
        checks.fraction("CRDTerm", "momentum", momentum, zero=True, one=False)
        self.feat_dim = feat_dim
        self.embed_s: nn.Module | None = None
        self.embed_t: nn.Module | None = None
        self.memory = ContrastMemory(feat_dim, num_negatives, nce_temperature, momentum, seed)

    def build(self, student: StagedOutput, teacher: StagedOutput) -> None:
        device = student.embedding.device
        self.embed_s = Embed(student.embedding.shape[1], self.feat_dim).to(device)
        self.embed_t = Embed(teacher.embedding.shape[1], self.feat_dim).to(device)

    def setup_data(self, targets: torch.Tensor) -> None:
        self.memory.setup(targets)

    def forward(
        self, student: StagedOutput, teacher: StagedOutput, target: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        return self.memory(self.embed_s(student.embedding), self.embed_t(teacher.embedding.detach()), index)
