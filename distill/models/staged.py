"""The staged interface every model of the zoo exposes (DESIGN.md, "Staged network").

A staged network is ``stem -> stages[0] -> ... -> stages[-1] -> head``. Methods read features
through this interface instead of forward hooks, so nothing breaks under DDP's ``module.`` prefix
and parameter names stay the classic ones (``conv1``, ``layer1.0.conv1``, ``fc``) that community
checkpoints use: ``stem``, ``stages`` and ``head`` are *views* built from the registered children,
never registered themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class StagedOutput(NamedTuple):
    """Everything a distillation loss may read from one forward pass."""

    logits: torch.Tensor
    stages: tuple[torch.Tensor, ...]  # output of every resolution stage, in order
    feature: torch.Tensor  # pre-pool feature map (last stage after the head's final norm/act)
    embedding: torch.Tensor  # pooled, flattened feature fed to the classifier


class Chain(nn.Sequential):
    """An unregistered view that runs existing modules in order (parameters are shared)."""


class Head(nn.Module):
    """Final norm/activation (``pre``), global average pooling and the classifier."""

    def __init__(self, classifier: nn.Module, pre: nn.Module | None = None):
        super().__init__()
        self.pre = pre if pre is not None else nn.Identity()
        self.classifier = classifier

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the pre-pool feature map and the pooled embedding."""
        feature = self.pre(x)
        embedding = torch.flatten(F.adaptive_avg_pool2d(feature, 1), 1)
        return feature, embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x)[1])

    def without_pre(self) -> Head:
        """The head from its ``pre``'s output on: pooling and the classifier."""
        return Head(self.classifier)


class StagedNet(nn.Module):
    """Base class of the zoo: subclasses define the three views over their classic children.

    ``forward(x)`` returns logits; ``forward(x, features=True)`` returns a :class:`StagedOutput`.
    """

    @property
    def stem(self) -> nn.Module:
        raise NotImplementedError

    @property
    def stages(self) -> Sequence[nn.Module]:
        raise NotImplementedError

    @property
    def head(self) -> Head:
        raise NotImplementedError

    def unavailable_outputs(self) -> dict[str, str]:
        """The :class:`StagedOutput` fields this network cannot give, each with the reason (none here)."""
        return {}

    def forward_stages(self, x: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """Run the stem and the first ``upto`` stages (all by default); return each stage's output."""
        x = self.stem(x)
        outputs = []
        for stage in list(self.stages)[:upto]:
            x = stage(x)
            outputs.append(x)
        return outputs

    def forward(self, x: torch.Tensor, features: bool = False):
        stage_outputs = self.forward_stages(x)
        head = self.head
        feature, embedding = head.features(stage_outputs[-1])
        logits = head.classifier(embedding)
        if not features:
            return logits
        return StagedOutput(logits, tuple(stage_outputs), feature, embedding)


@contextmanager
def evaluating(*modules: nn.Module):
    """Run ``modules`` in eval mode and without autograd inside the block; their modes are restored after."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def probe(model: nn.Module, in_chans: int, size: int, batch: int = 2) -> torch.Tensor:
    """A zero batch on ``model``'s device and dtype: the input of every dry run that sizes connectors."""
    param = next(model.parameters())
    return torch.zeros(batch, in_chans, size, size, device=param.device, dtype=param.dtype)


def dry_run(model: StagedNet, in_chans: int, size: int, features: bool = True):
    """``model``'s output on a zero batch of 2, in eval mode without autograd (sizes connectors: methods
    build their terms from the student's and the teacher's dry runs)."""
    with evaluating(model):
        return model(probe(model, in_chans, size), features=features)


def require_outputs(reader: str, fields: frozenset[str], **networks: StagedNet) -> None:
    """Refuse, in one line, a ``reader`` (a term) that reads a field one of ``networks`` cannot give.

    ``networks`` maps a role (``teacher``, ``student``) to its network.
    """
    for role, net in networks.items():
        unavailable = net.unavailable_outputs()
        for field in sorted(fields & unavailable.keys()):
            name = getattr(net, "name", type(net).__name__)
            raise ValueError(f"{reader} reads the {role}'s {field}, which {name} cannot give: {unavailable[field]}")


def stage_channels(model: StagedNet, in_chans: int = 3, size: int = 32) -> list[int]:
    """Channel count of every stage output, found by a dry run on a zero image."""
    with evaluating(model):
        return [o.shape[1] for o in model.forward_stages(probe(model, in_chans, size, batch=1))]
