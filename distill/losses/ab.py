"""AB: activation boundaries (Heo et al., AAAI 2019, "Knowledge Transfer via Distillation of
Activation Boundaries Formed by Hidden Neurons").

AB is used only in an initialisation phase: :class:`ABTerm` trains its connectors and the student's
stem and stages on the AB loss of the pre-activations for ``init_epochs`` (the CRD benchmark: 30,
at the base LR), after which the main training is CE alone (the term's loss is not used again).
The connectors are :class:`~distill.losses.ConvRegressor` with ``relu=False`` where the shapes
differ, the identity where they agree (the benchmark's ``Connector``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .. import checks
from ..models.staged import StagedOutput
from .fitnet import ConvRegressor
from .term import DistillTerm


def ab_loss(stages_s: Sequence[torch.Tensor], stages_t: Sequence[torch.Tensor], margin: float = 1.0) -> torch.Tensor:
    """Σ_i 2^−(n−1−i) · Σ_elements ℓ(s, t) / B over the n pre-activation pairs (deepest weighted 1).

    ℓ is the alternative hinge-squared loss of the official code: (s + μ)² where the teacher neuron
    is off (t ≤ 0) and s > −μ, (s − μ)² where it is on (t > 0) and s ≤ μ, μ = ``margin``; ``s`` are
    the student's connector outputs, ``t`` the teacher's pre-activations of the same shape. The CRD
    benchmark's ``ABLoss`` returns these terms times 3/1000 (its init phase's effective weight).
    Float32 (autocast off), teacher detached.
    """
    shapes_s, shapes_t = [tuple(f.shape) for f in stages_s], [tuple(f.shape) for f in stages_t]
    if shapes_s != shapes_t:
        raise ValueError(f"AB compares maps of equal shapes (connector outputs), got {shapes_s} and {shapes_t}")
    n = len(stages_s)
    total = stages_s[0].new_zeros((), dtype=torch.float32)
    with torch.autocast(stages_s[0].device.type, enabled=False):
        for i, (s, t) in enumerate(zip(stages_s, stages_t)):
            s, on = s.float(), t.detach() > 0
            loss = torch.where(on, (s - margin).pow(2) * (s <= margin), (s + margin).pow(2) * (s > -margin))
            total = total + loss.sum() / 2 ** (n - 1 - i)
    return total / stages_s[0].shape[0]


class ABTerm(DistillTerm):
    """AB's initialisation phase (see the module docstring).

    Args:
        weight: weight of the AB loss in its phase ([chosen] 3/1000, the factor the CRD benchmark's
            ``ABLoss`` applies; nothing balances it against CE, which the phase does not use).
        margin: μ of the hinge.
        init_epochs: length of the phase (the benchmark's ``init_epochs``, 30).
    """

    name = "ab"
    reads_teacher = frozenset({"preacts"})
    init_trains_student = True
    used_after_init = False

    def __init__(self, weight: float = 3e-3, margin: float = 1.0, init_epochs: int = 30):
        super().__init__(weight)
        checks.positive("ABTerm", "margin", margin)
        checks.positive_int("ABTerm", "init_epochs", init_epochs)
        self.margin, self.init_epochs = margin, init_epochs
        self.connectors = nn.ModuleList()

    def build(self, student: StagedOutput, teacher: StagedOutput) -> None:
        shapes = [(tuple(s.shape[1:]), tuple(t.shape[1:])) for s, t in zip(student.preacts, teacher.preacts)]
        self.connectors = nn.ModuleList(nn.Identity() if s == t else ConvRegressor(s, t, relu=False) for s, t in shapes)

    def init_loss(self, student: StagedOutput | None, teacher: StagedOutput) -> torch.Tensor:
        mapped = [connector(s) for connector, s in zip(self.connectors, student.preacts)]
        return self.weight * ab_loss(mapped, teacher.preacts, self.margin)
