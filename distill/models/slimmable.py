"""Weight-sharing widths for any zoo model, the teacher side of PWKD (Zhang, Zhang, Sun, 2021,
"Partial to Whole Knowledge Distillation"; docs/paradigms/pwkd.md#project-choices).

:func:`make_slimmable` converts a model in place: every ``Conv2d``, ``BatchNorm2d`` and ``Linear``
becomes its slimmable subclass (same parameter names, same tensors), so the full width is the
ordinary network and loads ordinary checkpoints. At width ``w`` the sub-network really computes
with fewer channels, using prefix slices of the shared weights:

- a layer with ``C`` outputs keeps the first ``round(w·C)`` of them (rounded half up); every layer
  reads however many channels its input carries, i.e. the first ones of its weight's input side.
  The stem's input (the image) and the classifier's outputs (the head's ``Linear``) stay whole.
  Residual additions, concatenations, splits and shuffles stay consistent because layers of equal
  width round equally and every block computes on the channels it is given.
- [chosen] depthwise convolutions follow their input (``groups`` = input channels); grouped
  convolutions keep their number of groups and take the first ``out'`` filters and the first
  ``in'/groups`` input columns of the weight tensor. Every convolution of a block that contains a
  grouped convolution rounds its width to a multiple of the groups (ShuffleNetV1), so the grouped
  layers always receive whole groups.
- each BatchNorm has a private copy per width (the whole width keeps the ordinary keys ``bn.weight``
  …; a narrower one lives under ``bn.per_width.w0_25.*``), sized by a dry run at conversion and
  initialised from the slices of the whole-width statistics.

:func:`set_width` switches the active width.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .staged import evaluating, probe
from .weights import load_weights, read_state_dict

DEFAULT_WIDTHS = (0.25, 0.5, 0.75, 1.0)
_PER_WIDTH = re.compile(r"(?:^|\.)per_width\.w(\d+(?:_\d+)?)\.")


def width_name(width: float) -> str:
    """``0.25 -> "w0_25"``: the key of a width in state_dicts and metric names (no dots)."""
    return f"w{width:g}".replace(".", "_")


def channels_at(full: int, width: float, quantum: int = 1) -> int:
    """Channels a layer of ``full`` outputs keeps at ``width``: round(width·full) (half up), a
    positive multiple of ``quantum``; exactly ``full`` at width 1."""
    if width == 1.0:
        return full
    return quantum * max(1, math.floor(width * full / quantum + 0.5))


def check_widths(widths: Sequence[float]) -> tuple[float, ...]:
    """Sorted unique widths in (0, 1] that include the whole width 1.0, or a ValueError naming them."""
    widths = tuple(sorted({float(w) for w in widths}))
    if not widths or widths[0] <= 0 or widths[-1] != 1.0:
        raise ValueError(f"slimmable widths must lie in (0, 1] and include 1.0, got {list(widths)}")
    return widths


class Slimmable:
    """Marks a layer whose active width :func:`set_width` sets."""

    width: float = 1.0


class SlimmableConv2d(nn.Conv2d, Slimmable):
    quantum: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.width == 1.0:
            return super().forward(x)
        in_ch = x.shape[1]
        if self.groups == self.in_channels and self.groups > 1:  # depthwise: follow the input
            groups, out_ch = in_ch, in_ch * (self.out_channels // self.in_channels)
        else:
            groups, out_ch = self.groups, channels_at(self.out_channels, self.width, self.quantum)
            if in_ch % groups or out_ch % groups:
                raise ValueError(f"a conv with {groups} groups got {in_ch} input and {out_ch} output channels")
        weight = self.weight[:out_ch, : in_ch // groups]
        bias = None if self.bias is None else self.bias[:out_ch]
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups)


class SlimmableLinear(nn.Linear, Slimmable):
    whole_out: bool = False  # the classifier keeps every class

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.width == 1.0:
            return super().forward(x)
        out = self.out_features if self.whole_out else channels_at(self.out_features, self.width)
        bias = None if self.bias is None else self.bias[:out]
        return F.linear(x, self.weight[:out, : x.shape[-1]], bias)


class SlimmableBatchNorm2d(nn.BatchNorm2d, Slimmable):
    """The whole width is this BatchNorm itself; narrower widths use ``per_width[width_name(w)]``."""

    per_width: nn.ModuleDict

    def active(self) -> nn.BatchNorm2d:
        """The BatchNorm the active width runs."""
        return self if self.width == 1.0 else self.per_width[width_name(self.width)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.width == 1.0:
            return super().forward(x)
        return self.per_width[width_name(self.width)](x)

    def add_width(self, width: float, channels: int) -> None:
        """A private BatchNorm for ``width`` over the first ``channels``, starting from this one's slices."""
        like = next(self.parameters(recurse=False), self.running_mean)
        bn = nn.BatchNorm2d(
            channels,
            self.eps,
            self.momentum,
            self.affine,
            self.track_running_stats,
            device=like.device,
            dtype=like.dtype,
        )
        with torch.no_grad():
            for name, tensor in bn.named_parameters(recurse=False):
                tensor.copy_(getattr(self, name)[:channels])
            for name, tensor in bn.named_buffers(recurse=False):
                source = getattr(self, name)
                tensor.copy_(source if source.dim() == 0 else source[:channels])
        self.per_width[width_name(width)] = bn.train(self.training)


_SLIMMABLE = {nn.Conv2d: SlimmableConv2d, nn.Linear: SlimmableLinear, nn.BatchNorm2d: SlimmableBatchNorm2d}


def make_slimmable(model: nn.Module, widths: Sequence[float] = DEFAULT_WIDTHS, image_size: int = 32) -> nn.Module:
    """Convert ``model`` (a :class:`~distill.models.StagedNet`) in place to run at every width of ``widths``.

    The per-width BatchNorms are sized by a dry run at each width on a zero image of
    ``image_size`` pixels; a width the architecture cannot run at raises a ValueError.
    """
    widths = check_widths(widths)
    if getattr(model, "slimmable_widths", None):
        raise ValueError(f"{type(model).__name__} is already slimmable (widths {list(model.slimmable_widths)})")
    for name, module in model.named_modules():
        if next(module.parameters(recurse=False), None) is not None and type(module) not in _SLIMMABLE:
            raise ValueError(
                f"cannot make {name!r} ({type(module).__name__}) slimmable: only Conv2d, BatchNorm2d and Linear are"
            )
        if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
            raise ValueError(f"cannot make {name!r} slimmable: padding_mode {module.padding_mode!r} (expected 'zeros')")
    classifiers = {id(m) for m in model.head.classifier.modules() if isinstance(m, nn.Linear)}
    for module in list(model.modules()):
        convs = [c for c in module.children() if type(c) is nn.Conv2d]
        quantum = math.lcm(1, *(c.groups for c in convs if 1 < c.groups < c.in_channels))
        for conv in convs:
            conv.quantum = math.lcm(quantum, conv.groups if conv.groups < conv.in_channels else 1)
    for module in model.modules():
        if type(module) in _SLIMMABLE:
            if isinstance(module, nn.Linear):
                module.whole_out = id(module) in classifiers
            module.__class__ = _SLIMMABLE[type(module)]
            if isinstance(module, SlimmableBatchNorm2d):
                module.per_width = nn.ModuleDict()
    model.slimmable_widths = widths
    _size_batchnorms(model, image_size)
    return model


def _size_batchnorms(model: nn.Module, image_size: int) -> None:
    """Dry run at every narrow width; each BatchNorm adds its private copy for the channels it sees."""
    stem = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    images = probe(model, stem.in_channels, image_size)

    def add_width(bn, inputs):
        if width_name(bn.width) not in bn.per_width:
            bn.add_width(bn.width, inputs[0].shape[1])

    hooks = [m.register_forward_pre_hook(add_width) for m in model.modules() if isinstance(m, SlimmableBatchNorm2d)]
    try:
        with evaluating(model):
            for width in model.slimmable_widths[:-1]:
                set_width(model, width)
                try:
                    model(images)
                except (RuntimeError, ValueError) as err:
                    raise ValueError(f"{type(model).__name__} cannot run at width {width}: {err}") from err
    finally:
        for hook in hooks:
            hook.remove()
        set_width(model, 1.0)


def set_width(model: nn.Module, width: float) -> None:
    """Run ``model`` (made slimmable by :func:`make_slimmable`) at ``width`` from now on."""
    widths = getattr(model, "slimmable_widths", None)
    if widths is None:
        raise ValueError(f"{type(model).__name__} is not slimmable (see make_slimmable)")
    if width not in widths:
        raise ValueError(f"width {width} is not one of the widths {list(widths)} this model was made slimmable at")
    for module in model.modules():
        if isinstance(module, Slimmable):
            module.width = width


def get_width(model: nn.Module) -> float:
    """The width ``model`` currently runs at."""
    return next(m.width for m in model.modules() if isinstance(m, Slimmable))


def checkpoint_widths(state: dict[str, torch.Tensor]) -> tuple[float, ...]:
    """The widths a state_dict holds BatchNorms for: its ``per_width.w*`` keys, plus the whole width."""
    found = {float(m.group(1).replace("_", ".")) for key in state for m in [_PER_WIDTH.search(key)] if m}
    return tuple(sorted(found | {1.0}))


def load_slimmable(
    model: nn.Module, path: str | Path, widths: Sequence[float] | None = None, image_size: int = 32
) -> nn.Module:
    """Make ``model`` slimmable and load ``path`` into it.

    A slimmable checkpoint (a ``SlimmableSupervised`` run or its state_dict) loads exactly, at the
    widths it was trained at (``widths``, when given, must match them). An ordinary checkpoint of
    the same architecture loads at the whole width first, so the narrow BatchNorms start from its
    sliced statistics; its sub-networks are then untrained.
    """
    trained = checkpoint_widths(read_state_dict(path))
    if trained == (1.0,):
        load_weights(model, path)
        return make_slimmable(model, widths or trained, image_size)
    if widths is not None and check_widths(widths) != trained:
        raise ValueError(
            f"{path} holds a slimmable network trained at widths {list(trained)}, not {list(check_widths(widths))}"
        )
    make_slimmable(model, trained, image_size)
    return load_weights(model, path)


def fewest_channels(model: nn.Module) -> tuple[str, int] | None:
    """``(path, channels)`` of the convolution with the fewest output channels at any width ``model`` runs
    at (a slimmable network's narrowest width included); ``None`` without convolutions."""
    narrowest = min(getattr(model, "slimmable_widths", None) or (1.0,))
    counts = [
        (path, channels_at(m.out_channels, narrowest, m.quantum) if isinstance(m, SlimmableConv2d) else m.out_channels)
        for path, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    ]
    return min(counts, key=lambda count: count[1], default=None)
