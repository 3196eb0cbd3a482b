"""KR — Knowledge Representing (Liu, Wen, Gao, et al., 2019, "Knowledge Representing: Efficient,
Sparse Representation of Prior Knowledge for Knowledge Distillation").

[paper] The teacher's parameter distribution is prior knowledge; a knowledge aggregation represents
it at a more abstract level; a sparse recoding penalty lets only part of it pull on the student;
KR combines with logit KD. Only the abstract could be read: everything below is the project's
reading (docs/paradigms/kr.md#what-the-project-does, [chosen]), not the paper's verified algorithm.

[chosen] Layer matching (:func:`match_layers`, printed as a table at fit start on rank zero):

- A network's *groups* are its stem, its stages and its head (``stem``, ``stage1`` …, ``head``).
  Stem ↔ stem, head ↔ head; student stage s of N_s ↦ teacher stage r(s, N_s, N_t).
- r(i, n_s, n_t) = ⌊i·(n_t − 1)/(n_s − 1) + ½⌋, and 0 when n_s = 1: first ↦ first, last ↦ last; a
  lone student layer takes the first teacher layer, which reads the same input.
- A group's *blocks* (:func:`split_blocks`): Sequential/ModuleList containers are transparent; a
  module that holds a conv directly (through containers only) is one block (a residual block, an
  inverted residual); a module that only holds such blocks is looked through (WRN's NetworkBlock);
  a bare conv is a block of its own (VGG, the stems).
- A conv's *kind* is its kernel size (``match_kernel_size``; else all convs are one kind); its
  *block position* p is its index among the convs of its kind in its block, in module order
  (BasicBlock: 3×3 conv1 → 0, conv2 → 1; the 1×1 shortcut → 0 of kind 1×1).
- Student conv c of kind κ and position p, the i-th of the n_s such convs of its group, is matched
  to the r(i, n_s, n_t)-th of the n_t teacher convs of kind κ and position p of the matched group;
  if the teacher has none at p, to the same relative depth among all its convs of kind κ (i, n_s
  counted among the student's convs of kind κ); if it has none of kind κ, c gets no prior.
- ``level="stage"``: c's prior is the mean of the aggregations of *all* those n_t teacher convs (a
  stage's blocks averaged into one prior per block position, whatever the block counts), instead
  of the r(i)-th one. Convs at the same position and of the same shape get the same prior.

[chosen] Priors: each matched teacher weight is aggregated to the student's shape
(:func:`distill.losses.kr.aggregate_weight`), averaged (stage level), then rescaled to the
standard deviation the student conv had at initialisation. Only conv weights get priors (not biases,
norms or the classifier). The student starts from its priors (``init_from_prior``, default on: it
is the project's reading, docs/paradigms/kr.md#knowledge-aggregation, and the authors' related
patent hands the shrunk teacher filters to the student; the penalty then starts at zero and pulls
back only what drifts). The penalty β·R is logged
as ``train/loss_kr``; ``train/kr_mask_density``,
``train/kr_distance`` and ``train/kr_distance_masked`` (mean |W_S − W_D| over all / masked entries)
at every epoch end.

Resume and DDP: priors and masks are buffers built in ``__init__`` (before a checkpoint is
restored), so they are saved and restored with the run. The aggregation is deterministic, but the
rescaling reads each rank's own student initialisation (different ranks draw different ones when a
run is not seeded): rank 0's priors and masks are broadcast once at fit start, and DDP's per-step
buffer broadcast skips them. The teacher stays an unregistered attribute (TeacherMixin).
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
from pytorch_lightning.utilities import rank_zero_info
from torch import nn

from .. import checks
from ..errors import ConfigError
from ..losses.kr import Grouping, Shrink, aggregate_weight, prior_penalty, rescale_to_std, top_fraction_mask
from ..models import StagedNet
from .kd import OfflineKD


class LayerMatch(NamedTuple):
    """One row of the matching table: a student conv and the teacher conv(s) its prior comes from."""

    group: str
    student: str
    student_shape: tuple[int, ...]
    teachers: tuple[str, ...]  # empty: no teacher conv of this kind in the matched group
    teacher_shapes: tuple[tuple[int, ...], ...]
    penalised: bool  # has a prior and is selected by the ``layers`` patterns


def relative_index(i: int, n_s: int, n_t: int) -> int:
    """r(i, n_s, n_t) = ⌊i·(n_t − 1)/(n_s − 1) + ½⌋ (0 when n_s = 1), in integer arithmetic."""
    return 0 if n_s == 1 else (2 * i * (n_t - 1) + n_s - 1) // (2 * (n_s - 1))


def _has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def _items(module: nn.Module) -> list[nn.Module]:
    """The conv-holding children of ``module``, seen through Sequential/ModuleList containers."""
    items = []
    for child in module.children():
        if _has_conv(child):
            items += _items(child) if isinstance(child, (nn.Sequential, nn.ModuleList)) else [child]
    return items


def split_blocks(module: nn.Module) -> list[nn.Module]:
    """The blocks of a group (see the module docstring)."""
    if isinstance(module, nn.Conv2d):
        return [module]
    items = _items(module)
    if not isinstance(module, (nn.Sequential, nn.ModuleList)) and any(isinstance(i, nn.Conv2d) for i in items):
        return [module]
    return [block for item in items for block in split_blocks(item)]


def network_groups(model: StagedNet) -> list[tuple[str, nn.Module]]:
    stages = [(f"stage{s + 1}", stage) for s, stage in enumerate(model.stages)]
    return [("stem", model.stem), *stages, ("head", model.head)]


class _Conv(NamedTuple):
    name: str
    conv: nn.Conv2d
    kind: tuple
    position: int


def group_convs(group: nn.Module, names: dict[int, str], match_kernel_size: bool) -> list[_Conv]:
    """The convs of a group in module order, each with its kind and block position."""
    convs = []
    for block in split_blocks(group):
        seen: dict[tuple, int] = {}
        for conv in (m for m in block.modules() if isinstance(m, nn.Conv2d)):
            kind = tuple(conv.kernel_size) if match_kernel_size else ()
            convs.append(_Conv(names[id(conv)], conv, kind, seen.get(kind, 0)))
            seen[kind] = seen.get(kind, 0) + 1
    return convs


def _match_in_group(student: list[_Conv], teacher: list[_Conv], level: str) -> list[list[_Conv]]:
    """For every student conv of a group, the teacher convs its prior is made of."""
    matched = []
    for conv in student:
        same_slot = [c for c in teacher if (c.kind, c.position) == (conv.kind, conv.position)]
        peers = [c for c in student if (c.kind, c.position) == (conv.kind, conv.position)]
        if not same_slot:
            same_slot = [c for c in teacher if c.kind == conv.kind]
            peers = [c for c in student if c.kind == conv.kind]
        if level == "stage" or not same_slot:
            matched.append(same_slot)
        else:
            matched.append([same_slot[relative_index(peers.index(conv), len(peers), len(same_slot))]])
    return matched


def _matches(
    student: StagedNet, teacher: StagedNet, level: str, match_kernel_size: bool
) -> list[tuple[str, _Conv, list[_Conv]]]:
    s_names = {id(m): n for n, m in student.named_modules()}
    t_names = {id(m): n for n, m in teacher.named_modules()}
    s_groups, t_groups = network_groups(student), network_groups(teacher)
    t_stages = t_groups[1:-1]
    rows = []
    for g, (label, module) in enumerate(s_groups):
        if label in ("stem", "head"):
            t_module = dict(t_groups)[label]
        else:
            t_module = t_stages[relative_index(g - 1, len(s_groups) - 2, len(t_stages))][1]
        s_convs = group_convs(module, s_names, match_kernel_size)
        t_convs = group_convs(t_module, t_names, match_kernel_size)
        rows += [(label, c, m) for c, m in zip(s_convs, _match_in_group(s_convs, t_convs, level))]
    return rows


def match_layers(
    student: StagedNet,
    teacher: StagedNet,
    level: Literal["layer", "stage"] = "layer",
    match_kernel_size: bool = True,
    layers: Sequence[str] = ("*",),
) -> list[LayerMatch]:
    """The matching table: one row per student conv.

    ``layers``: fnmatch patterns on ``<group>/<student conv name>`` (``stage2/*``, ``*downsample*``);
    a conv is penalised when it has a teacher match and some pattern selects it. A pattern that
    selects no student conv is an error.
    """
    checks.choice("match_layers", "level", level, ("layer", "stage"))
    rows = _matches(student, teacher, level, match_kernel_size)
    keys = [f"{label}/{conv.name}" for label, conv, _ in rows]
    for pattern in layers:
        if not any(fnmatchcase(key, pattern) for key in keys):
            raise ConfigError(f"layers: pattern {pattern!r} selects no student conv; the convs are {', '.join(keys)}")
    return [
        LayerMatch(
            label,
            conv.name,
            tuple(conv.conv.weight.shape),
            tuple(t.name for t in teachers),
            tuple(tuple(t.conv.weight.shape) for t in teachers),
            bool(teachers) and any(fnmatchcase(key, p) for p in layers),
        )
        for (label, conv, teachers), key in zip(rows, keys)
    ]


def format_matching(matches: Sequence[LayerMatch]) -> str:
    """The table as text: group, student conv and shape, teacher conv(s) and shape(s), prior."""

    def shape(s):
        return "x".join(map(str, s))

    def teachers(names):
        if len(names) > 1:
            return f"{names[0]} … {names[-1]} (mean of {len(names)})"
        return names[0] if names else "-"

    lines = [f"{'group':<7} {'student conv':<28} {'shape':<16} {'teacher conv(s)':<52} {'shape':<16} prior"]
    for m in matches:
        t_shapes = " / ".join(dict.fromkeys(shape(s) for s in m.teacher_shapes)) or "-"
        lines.append(
            f"{m.group:<7} {m.student:<28} {shape(m.student_shape):<16} {teachers(m.teachers):<52} "
            f"{t_shapes:<16} {'yes' if m.penalised else 'no'}"
        )
    return "\n".join(lines)


def aggregate_prior(
    student: nn.Conv2d, teachers: Sequence[nn.Conv2d], grouping: Grouping, shrink: Shrink, seed: int
) -> torch.Tensor:
    """The mean of the teacher convs' weights, each aggregated to the student conv's shape (float64,
    not yet rescaled)."""
    return torch.stack(
        [
            aggregate_weight(t.weight, t.groups, student.weight.shape, student.groups, grouping, shrink, seed)
            for t in teachers
        ]
    ).mean(0)


def _buffer_key(name: str) -> str:
    return name.replace(".", "__")


class KR(OfflineKD):
    """Offline KD (CE + the ``terms``, e.g. KD on logits) plus KR's sparse prior penalty β·R.

    Args (all [chosen], docs/paradigms/kr.md#knobs; the others as :class:`~distill.methods.kd.OfflineKD`):
        beta: the pull β of the prior on every masked weight: β·R adds β·(W_S − W_D) to its gradient,
            whatever the size of its layer, as weight decay λ adds λ·W_S (so β = λ pulls toward the
            prior as hard as weight decay pulls toward 0). Default from the Fashion-MNIST study's sweep
            (README, results), chosen on its held-out validation split.
        rho: fraction ρ of each layer's entries kept by the sparse recoding mask (1 = dense).
        level: ``layer`` (one teacher conv per student conv) or ``stage`` (the mean over the stage's
            blocks at the same block position).
        layers: fnmatch patterns on ``<group>/<conv name>`` selecting the penalised convs (all).
        match_kernel_size: match only convs of the same kernel size (else any, kernels resized).
        grouping: ``contiguous`` groups of output filters, or ``kmeans`` clusters of them.
        shrink_kernel: a larger teacher kernel is centre-``crop``-ped or area-``average``-d.
        prior: ``aggregated`` teacher knowledge, or ``random`` (ablation: a Gaussian draw with the
            student's initial std, same layers, masks and penalty).
        init_from_prior: copy the priors into the student's conv weights at construction.
        remask_every_epoch: from the second epoch on, recompute each mask at the epoch start as
            the top ρ of |W_S − W_D| (the first epoch uses the |W_D| mask).
        seed: seed of the k-means seeding and of the random prior.
    """

    main_reads_teacher = frozenset()  # the prior penalty reads priors built at construction, no teacher output

    def __init__(
        self,
        beta: float = 1e-3,
        rho: float = 0.1,
        level: Literal["layer", "stage"] = "layer",
        layers: list[str] | None = None,
        match_kernel_size: bool = True,
        grouping: Grouping = "contiguous",
        shrink_kernel: Shrink = "crop",
        prior: Literal["aggregated", "random"] = "aggregated",
        init_from_prior: bool = True,
        remask_every_epoch: bool = False,
        seed: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        checks.non_negative("KR", "beta", beta)
        checks.fraction("KR", "rho", rho)
        checks.choice("KR", "level", level, ("layer", "stage"))
        checks.choice("KR", "grouping", grouping, ("contiguous", "kmeans"))
        checks.choice("KR", "shrink_kernel", shrink_kernel, ("crop", "average"))
        checks.choice("KR", "prior", prior, ("aggregated", "random"))
        self.beta, self.rho, self.remask_every_epoch = beta, rho, remask_every_epoch
        self.matching = match_layers(self.student, self.teacher, level, match_kernel_size, layers or ["*"])
        selected = [m for m in self.matching if m.penalised]
        if not selected:
            raise ConfigError(
                f"KR: no student conv gets a prior ({self.hparams.student} from {self.hparams.teacher}, "
                f"layers={layers}):\n{format_matching(self.matching)}"
            )
        self.priors, self.prior_masks = nn.Module(), nn.Module()
        self.prior_convs = [self.student.get_submodule(m.student) for m in selected]
        generator = torch.Generator().manual_seed(seed)
        for match, conv in zip(selected, self.prior_convs):
            if prior == "random":
                value = torch.randn(conv.weight.shape, generator=generator, dtype=torch.float64)
            else:
                teachers = [self.teacher.get_submodule(name) for name in match.teachers]
                value = aggregate_prior(conv, teachers, grouping, shrink_kernel, seed)
            value = rescale_to_std(value, conv.weight.detach().double().std(correction=0)).to(conv.weight.dtype)
            self.priors.register_buffer(_buffer_key(match.student), value)
            self.prior_masks.register_buffer(_buffer_key(match.student), top_fraction_mask(value, rho))
            if init_from_prior:
                with torch.no_grad():
                    conv.weight.copy_(value)
        # Rank 0's buffers are broadcast once (on_fit_start), not at every step.
        self._ddp_params_and_buffers_to_ignore = [
            f"{holder}.{key}"
            for holder in ("priors", "prior_masks")
            for key, _ in getattr(self, holder).named_buffers()
        ]

    def prior_tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Student weights, priors and masks of the penalised convs, in matching-table order."""
        return [c.weight for c in self.prior_convs], list(self.priors.buffers()), list(self.prior_masks.buffers())

    def main_losses(self, images, targets, index):
        losses, logits = super().main_losses(images, targets, index)
        losses["kr"] = self.beta * prior_penalty(*self.prior_tensors())
        return losses, logits

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            rank_zero_info(
                f"KR layer matching ({self.hparams.teacher} -> {self.hparams.student}):\n"
                f"{format_matching(self.matching)}"
            )

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if dist.is_available() and dist.is_initialized() and self.trainer.world_size > 1:
            for buffer in (*self.priors.buffers(), *self.prior_masks.buffers()):
                dist.broadcast(buffer, src=0)

    @torch.no_grad()
    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        if self.remask_every_epoch and self.current_epoch > 0:
            for weight, prior, mask in zip(*self.prior_tensors()):
                mask.copy_(top_fraction_mask(weight - prior, self.rho))

    @torch.no_grad()
    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        weights, priors, masks = self.prior_tensors()
        distance = torch.cat([(w.float() - p.float()).abs().flatten() for w, p in zip(weights, priors)])
        mask = torch.cat([m.flatten() for m in masks])
        stats = {
            "train/kr_mask_density": mask.float().mean(),
            "train/kr_distance": distance.mean(),
            "train/kr_distance_masked": distance[mask].mean(),
        }
        self.log_dict(stats, sync_dist=True)
