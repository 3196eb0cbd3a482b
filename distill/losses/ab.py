"""AB: activation boundaries (Heo et al., AAAI 2019, "Knowledge Transfer via Distillation of
Activation Boundaries Formed by Hidden Neurons").

Only the loss: AB trains connectors and the student's backbone on it in an initialisation phase
(the CRD benchmark: 30 epochs, then CE only), which belongs to the stage mechanism, not to a term.
The connectors are :class:`~distill.losses.ConvRegressor` with ``relu=False`` where the shapes
differ, the identity where they agree (the benchmark's ``Connector``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


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
