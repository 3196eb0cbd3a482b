"""The staged interface every model of the zoo exposes (docs/design.md#the-staged-interface).

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
    """Everything a distillation loss may read from one forward pass.

    ``preacts`` and ``preact_bn`` are filled only by a network that keeps its pre-activations
    (:meth:`StagedNet.keep_preacts`); otherwise they are ``None``.
    """

    logits: torch.Tensor
    stages: tuple[torch.Tensor, ...]  # output of every resolution stage, in order
    feature: torch.Tensor  # pre-pool feature map (last stage after the head's final norm/act)
    embedding: torch.Tensor  # pooled, flattened feature fed to the classifier
    preacts: tuple[torch.Tensor, ...] | None = None  # every stage's output before its final ReLU
    # per stage, (weight, bias) of the BatchNorm that produces the pre-activation, or None where none does
    preact_bn: tuple[tuple[torch.Tensor, torch.Tensor] | None, ...] | None = None


def preact_bn_of(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of a pre-activation's BatchNorm (a slimmable BatchNorm's at its active width)."""
    bn = bn.active() if hasattr(bn, "active") else bn
    return bn.weight, bn.bias


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

    Pre-activations (what OFD and ReviewKD distil, after the CRD benchmark's ``preact=True``): an
    architecture that defines them sets ``defines_preacts`` and, unless its stages end in a block
    with a ``preact(x)`` method (the sum before the block's final ReLU), overrides
    :meth:`block_preact` or :meth:`stage_preact`; :meth:`preact_norms` names the BatchNorm behind
    each. They are computed only after :meth:`keep_preacts`, so the ordinary forward does no extra work.
    """

    defines_preacts: bool = False
    preacts_kept: bool = False

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
        """The :class:`StagedOutput` fields this network cannot give, each with the reason: the
        pre-activations where the architecture defines none."""
        if self.defines_preacts:
            return {}
        reason = f"{type(self).__name__} defines no pre-activation stage outputs"
        return {"preacts": reason, "preact_bn": reason}

    def forward_stages(self, x: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """Run the stem and the first ``upto`` stages (all by default); return each stage's output."""
        x = self.stem(x)
        outputs = []
        for stage in list(self.stages)[:upto]:
            x = stage(x)
            outputs.append(x)
        return outputs

    def keep_preacts(self) -> None:
        """Fill :attr:`StagedOutput.preacts` and ``preact_bn`` in every ``forward(x, features=True)`` from now on."""
        if not self.defines_preacts:
            raise ValueError(f"{type(self).__name__} does not define pre-activation stage outputs")
        self.preacts_kept = True

    def stage_preact(self, index: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, pre-activation) of stage ``index`` on ``x``. By default the stage is a sequence of
        blocks, the pre-activation is :meth:`block_preact` of its last one and the output its ReLU."""
        stage = self.stages[index]
        pre = self.block_preact(stage[-1], stage[:-1](x))
        return F.relu(pre), pre

    @staticmethod
    def block_preact(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A block's output before its final ReLU: its ``preact(x)``."""
        return block.preact(x)

    def preact_norms(self) -> list[nn.Module | None]:
        """Per stage, the BatchNorm whose output (before any residual sum) is the pre-activation, or None."""
        return [None] * len(self.stages)

    def preact_bn_params(self) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, ...]:
        """:attr:`StagedOutput.preact_bn`: (weight, bias) of every :meth:`preact_norms` entry (a slimmable
        BatchNorm's at its active width)."""
        return tuple(None if bn is None else preact_bn_of(bn) for bn in self.preact_norms())

    def forward_preacts(self, x: torch.Tensor) -> StagedOutput:
        """``forward(x, features=True)`` with the pre-activations of every stage."""
        x = self.stem(x)
        outputs, preacts = [], []
        for index in range(len(self.stages)):
            x, pre = self.stage_preact(index, x)
            outputs.append(x)
            preacts.append(pre)
        head = self.head
        feature, embedding = head.features(x)
        return StagedOutput(
            head.classifier(embedding), tuple(outputs), feature, embedding, tuple(preacts), self.preact_bn_params()
        )

    def forward(self, x: torch.Tensor, features: bool = False):
        if features and self.preacts_kept:
            return self.forward_preacts(x)
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
