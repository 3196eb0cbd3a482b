"""Connectors that follow a slimmable teacher's width (PWKD): one whole connector sliced to the active
width, or a fresh connector per stage."""

from __future__ import annotations

import torch
from torch import nn


def _prefix(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return tensor[tuple(slice(0, n) for n in shape)]


class SlicedConnector(nn.Module):
    """A connector built for the whole teacher, run at a narrower teacher width on the leading slices
    of its own parameters and buffers, shaped as the connector its term builds for that width.

    ``narrow`` maps a width to that connector (used for its structure only: unregistered, never
    trained); every width shares the whole connector's tensors, so nothing is unused under DDP.
    """

    def __init__(self, whole: nn.Module, narrow: dict[float, nn.Module]):
        super().__init__()
        self.whole = whole
        object.__setattr__(self, "narrow", narrow)
        self.width = 1.0

    def forward(self, *args):
        template = self.narrow.get(self.width)
        if template is None:
            return self.whole(*args)
        template.train(self.training)
        tensors = {**dict(self.whole.named_parameters()), **dict(self.whole.named_buffers())}
        shapes = {**dict(template.named_parameters()), **dict(template.named_buffers())}
        sliced = {name: _prefix(tensors[name], shapes[name].shape) for name in shapes}
        return torch.func.functional_call(template, sliced, args)


class PerStageConnector(nn.Module):
    """One freshly initialised connector per stage; only the active stage's one is used (and trained)."""

    def __init__(self, per_stage: list[nn.Module]):
        super().__init__()
        self.per_stage = nn.ModuleList(per_stage)
        self.stage = 0

    def forward(self, *args):
        return self.per_stage[self.stage](*args)


def tensor_shapes(module: nn.Module) -> dict[str, torch.Size]:
    return {name: t.shape for name, t in module.state_dict().items() if isinstance(t, torch.Tensor)}


def fits_inside(narrow: dict[str, torch.Size], whole: dict[str, torch.Size]) -> bool:
    return narrow.keys() == whole.keys() and all(
        len(narrow[k]) == len(whole[k]) and all(a <= b for a, b in zip(narrow[k], whole[k])) for k in narrow
    )
