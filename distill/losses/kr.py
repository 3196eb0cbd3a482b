"""KR's tensor math: knowledge aggregation, the sparse recoding mask and the prior penalty.

After Liu, Wen, Gao, et al., 2019, "Knowledge Representing: Efficient, Sparse Representation of
Prior Knowledge for Knowledge Distillation". Only the paper's abstract could be read, so everything
here is the project's reading of it (docs/paradigms/kr.md#what-the-project-does, [chosen]), not the
paper's verified algorithm:

- **Aggregation** maps a teacher conv weight W_T (C_out^T × C_in^T/g_T × k × k) to a student
  conv's shape: output filters and input channels are split into C_out^S and C_in^S contiguous
  groups (option: k-means clusters of the filters) and each group pair is averaged over the teacher
  connections that exist (so grouped and depthwise teachers average only their real weights);
  kernels are then matched by centre crop (option: area averaging) when the teacher's is larger and
  bilinear interpolation when it is smaller; a grouped student takes the block diagonal.
- **Mask**: the top ρ fraction of a layer's entries by magnitude.
- **Penalty**: R = ½ Σ_l Σ (M_l ⊙ (W_S^l − W_D^l))², in float32: a sum over entries, not a mean, so
  that β·R pulls every masked weight by β·(W_S − W_D), whatever the size of its layer — the form of
  weight decay λ·W_S, with the prior in place of 0 (β = λ is an equally strong pull).

Pure functions of tensors; the layer matching and the training live in :mod:`distill.methods.kr`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from .. import checks

Grouping = Literal["contiguous", "kmeans"]
Shrink = Literal["crop", "average"]


def group_membership(n: int, groups: int) -> torch.Tensor:
    """0/1 matrix (groups × n): group k holds indices ⌊k·n/groups⌋ … ⌊(k+1)·n/groups⌋ − 1.

    With more groups than indices (a wider student) each group holds the single index ⌊k·n/groups⌋,
    so teacher channels are repeated (nearest-neighbour upsampling).
    """
    members = torch.zeros(groups, n, dtype=torch.float64)
    for k in range(groups):
        start = k * n // groups
        members[k, start : max((k + 1) * n // groups, start + 1)] = 1
    return members


def kmeans_membership(rows: torch.Tensor, groups: int, seed: int = 0, iterations: int = 25) -> torch.Tensor:
    """0/1 matrix (groups × n) of a k-means clustering of ``rows`` (n × d), in float64.

    k-means++ seeding from ``torch.Generator().manual_seed(seed)``, Lloyd iterations; an emptied
    cluster takes the point farthest from its centre (among clusters of two or more), so every group
    is non-empty. Clusters are ordered by their smallest member index. With ``groups >= n`` there
    is nothing to cluster: :func:`group_membership` is returned.
    """
    n = rows.shape[0]
    if groups >= n:
        return group_membership(n, groups)
    x = rows.detach().double().reshape(n, -1)
    generator = torch.Generator().manual_seed(seed)
    squares = x.square().sum(1)

    def distance_to(j: int) -> torch.Tensor:
        return (squares - 2 * (x @ x[j]) + squares[j]).clamp_min(0)

    chosen = [int(torch.randint(n, (1,), generator=generator))]
    nearest = distance_to(chosen[0])
    for _ in range(1, groups):
        weights = nearest if nearest.sum() > 0 else torch.ones_like(nearest)
        chosen.append(int(torch.multinomial(weights, 1, generator=generator)))
        nearest = torch.minimum(nearest, distance_to(chosen[-1]))
    centres = x[chosen].clone()
    assign = torch.zeros(n, dtype=torch.long)
    for step in range(iterations):
        distances = torch.cdist(x, centres)
        new_assign = distances.argmin(1)
        counts = torch.bincount(new_assign, minlength=groups)
        for empty in (counts == 0).nonzero().flatten().tolist():
            movable = counts[new_assign] > 1
            cost = torch.where(movable, distances.gather(1, new_assign[:, None]).squeeze(1), -1.0)
            point = int(cost.argmax())
            counts[new_assign[point]] -= 1
            new_assign[point], counts[empty] = empty, 1
        if step and torch.equal(new_assign, assign):
            break
        assign = new_assign
        centres = torch.zeros_like(centres).index_add_(0, assign, x) / counts[:, None].double()
    members = F.one_hot(assign, groups).T.double()
    first = torch.stack([row.nonzero()[0, 0] for row in members])
    return members[first.argsort()]


def densify(weight: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A grouped conv weight (C_out × C_in/g × …) as a dense one (C_out × C_in × …), zero between
    groups, and the 0/1 matrix (C_out × C_in) of the connections that exist."""
    c_out, c_in_per_group = weight.shape[:2]
    out_group = torch.arange(c_out) // (c_out // groups)
    in_group = torch.arange(c_in_per_group * groups) // c_in_per_group
    connected = out_group[:, None] == in_group[None, :]
    dense = weight.new_zeros(c_out, c_in_per_group * groups, *weight.shape[2:])
    dense[connected] = weight.reshape(c_out * c_in_per_group, *weight.shape[2:])
    return dense, connected.to(weight.dtype)


def take_groups(dense: torch.Tensor, groups: int) -> torch.Tensor:
    """The block diagonal of a dense weight (C_out × C_in × …) as a grouped one (C_out × C_in/g × …)."""
    c_out, c_in = dense.shape[:2]
    connected = (torch.arange(c_out) // (c_out // groups))[:, None] == (torch.arange(c_in) // (c_in // groups))[None, :]
    return dense[connected].reshape(c_out, c_in // groups, *dense.shape[2:])


def aggregate_channels(
    weight: torch.Tensor, out_channels: int, in_channels: int, groups: int = 1, out_members: torch.Tensor | None = None
) -> torch.Tensor:
    """Average a (grouped) conv weight into ``out_channels × in_channels × k × k`` (dense).

    Entry (o, i) is the mean of the teacher weights W[a, b] with a in output group o and b in input
    group i, over the connections (a, b) that exist; 0 where none does. Output groups are
    ``out_members`` (groups × C_out^T, e.g. from :func:`kmeans_membership`), contiguous by default;
    input groups are contiguous.
    """
    dense, connected = densify(weight.double(), groups)
    if out_members is None:
        out_members = group_membership(dense.shape[0], out_channels)
    in_members = group_membership(dense.shape[1], in_channels)
    total = _group_sum(_group_sum(dense, 0, out_members), 1, in_members)
    count = _group_sum(_group_sum(connected, 0, out_members), 1, in_members)
    return total / count.clamp_min(1)[:, :, None, None]


def _group_sum(x: torch.Tensor, dim: int, members: torch.Tensor) -> torch.Tensor:
    """Σ over each group's members along ``dim`` (``members``: 0/1, groups × n), in O(numel)."""
    group, index = members.nonzero(as_tuple=True)
    shape = list(x.shape)
    shape[dim] = members.shape[0]
    return x.new_zeros(shape).index_add_(dim, group, x.index_select(dim, index))


def resize_kernel(weight: torch.Tensor, size: Sequence[int], shrink: Shrink = "crop") -> torch.Tensor:
    """Match the kernel (last two dims) to ``size``.

    A dimension that shrinks is centre-cropped (offset ⌊(k − k')/2⌋) or, with ``shrink="average"``,
    area-averaged; a dimension that grows is interpolated bilinearly with aligned corners (a 1×1
    kernel becomes constant; the centre of an odd kernel stays the centre).
    """
    checks.choice("resize_kernel", "shrink", shrink, ("crop", "average"))
    c_out, c_in, kh, kw = weight.shape
    th, tw = size
    flat = weight.reshape(c_out * c_in, 1, kh, kw)
    small = (min(kh, th), min(kw, tw))
    if small != (kh, kw):
        if shrink == "crop":
            top, left = (kh - small[0]) // 2, (kw - small[1]) // 2
            flat = flat[..., top : top + small[0], left : left + small[1]]
        else:
            flat = F.adaptive_avg_pool2d(flat, small)
    if small != (th, tw):
        flat = F.interpolate(flat, size=(th, tw), mode="bilinear", align_corners=True)
    return flat.reshape(c_out, c_in, th, tw)


def aggregate_weight(
    weight: torch.Tensor,
    groups: int,
    shape: Sequence[int],
    target_groups: int = 1,
    grouping: Grouping = "contiguous",
    shrink: Shrink = "crop",
    seed: int = 0,
) -> torch.Tensor:
    """Knowledge aggregation of one teacher conv weight into a student conv's ``shape`` (float64).

    ``groups``/``target_groups``: the teacher's and the student's conv groups. ``grouping="kmeans"``
    clusters the teacher's (densified) filters into C_out^S groups with :func:`kmeans_membership`.
    Not rescaled: see :func:`rescale_to_std`.
    """
    c_out, c_in_per_group, kh, kw = shape
    out_members = None
    if grouping == "kmeans":
        dense, _ = densify(weight.double(), groups)
        out_members = kmeans_membership(dense.reshape(dense.shape[0], -1), c_out, seed)
    else:
        checks.choice("aggregate_weight", "grouping", grouping, ("contiguous", "kmeans"))
    dense = aggregate_channels(weight, c_out, c_in_per_group * target_groups, groups, out_members)
    return take_groups(resize_kernel(dense, (kh, kw), shrink), target_groups)


def rescale_to_std(weight: torch.Tensor, std: float | torch.Tensor) -> torch.Tensor:
    """``weight`` times a scalar so that its (population) standard deviation is ``std``; a constant
    ``weight`` (std 0) is returned unchanged."""
    own = weight.std(correction=0)
    return weight * (std / own) if own > 0 else weight


def top_fraction_mask(reference: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean mask of the ⌊fraction·n + ½⌋ (at least one) entries of largest ``|reference|``.

    Ties are broken deterministically: among equal magnitudes the lower flat index is kept.
    """
    checks.fraction("top_fraction_mask", "fraction", fraction)
    magnitude = reference.detach().abs().flatten()
    n = magnitude.numel()
    keep = max(1, int(fraction * n + 0.5))
    threshold = torch.kthvalue(magnitude, n - keep + 1).values  # the keep-th largest
    above, tied = magnitude > threshold, magnitude == threshold
    mask = above | (tied & (tied.cumsum(0) <= keep - above.sum()))
    return mask.view_as(reference)


def prior_penalty(
    weights: Sequence[torch.Tensor], priors: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]
) -> torch.Tensor:
    """R = ½ Σ_l Σ (M_l ⊙ (W_S^l − W_D^l))², summed over the entries of every layer, in float32.

    Its gradient w.r.t. W_S^l is M_l ⊙ (W_S^l − W_D^l): the same pull on a masked entry of a layer of
    any size, zero outside the mask ([chosen]: a mean over a layer's entries would pull the entries
    of a 3×3×64×64 conv 36,864 times more weakly than those of a 1×1×1×1 one).
    """
    terms = [torch.where(m, w.float() - p.float(), 0.0).square().sum() for w, p, m in zip(weights, priors, masks)]
    return 0.5 * torch.stack(terms).sum()
