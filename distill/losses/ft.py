"""FT: factor transfer (Kim et al., NeurIPS 2018, "Paraphrasing Complex Network").

The paraphraser (an autoencoder of the teacher's last stage output) is trained on its
reconstruction (MSE) in an initialisation phase of ``init_epochs`` (the CRD benchmark: 30) and is
fixed afterwards; the main training adds the factor loss between the student's translator output and
the paraphraser's factor (weight 200 in the benchmark) to CE. :class:`FTTerm` does both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import checks
from ..models.staged import StagedOutput
from .at import attention_map
from .maps import pool_to_smaller
from .term import DistillTerm


def ft_loss(factor_s: torch.Tensor, factor_t: torch.Tensor, p1: float = 2.0, p2: int = 1) -> torch.Tensor:
    """mean(|a(F_s) − a(F_t)|^p2), a(F) = L2-normalise(mean over channels of F^p1), flattened: the CRD
    benchmark's ``FactorTransfer`` (p1 = 2, p2 = 1: an L1 distance); the larger factor map is first
    pooled to the smaller one's size. Float32 (autocast off), teacher side detached."""
    with torch.autocast(factor_s.device.type, enabled=False):
        factor_s, factor_t = pool_to_smaller(factor_s.float(), factor_t.detach().float())
        diff = attention_map(factor_s, p1) - attention_map(factor_t, p1)
        return diff.abs().mean() if p2 == 1 else diff.pow(p2).mean()


def _conv_stack(conv: type[nn.Module], widths: list[int], use_bn: bool) -> nn.Sequential:
    """3x3 (transposed) convs between consecutive ``widths``, each followed by [BN] and LeakyReLU(0.1)."""
    layers = []
    for c_in, c_out in zip(widths, widths[1:]):
        layers += [conv(c_in, c_out, 3, 1, 1), nn.BatchNorm2d(c_out) if use_bn else nn.Identity()]
        layers.append(nn.LeakyReLU(0.1, inplace=True))
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """The teacher's factor extractor: encoder C → C → kC → kC (3x3 convs), decoder back (3x3
    transposed convs), LeakyReLU(0.1) after each, no BatchNorm by default (the benchmark's ``Paraphraser``)."""

    def __init__(self, channels: int, rate: float = 0.5, use_bn: bool = False):
        super().__init__()
        factor = int(channels * rate)
        self.encoder = _conv_stack(nn.Conv2d, [channels, channels, factor, factor], use_bn)
        self.decoder = _conv_stack(nn.ConvTranspose2d, [factor, factor, channels, channels], use_bn)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(factor, reconstruction); the init phase trains on MSE(reconstruction, x)."""
        factor = self.encoder(x)
        return factor, self.decoder(factor)


class Translator(nn.Module):
    """The student's factor extractor: C_s → C_s → kC_t → kC_t (3x3 convs), BatchNorm and
    LeakyReLU(0.1) after each (the benchmark's ``Translator``)."""

    def __init__(self, s_channels: int, t_channels: int, rate: float = 0.5, use_bn: bool = True):
        super().__init__()
        factor = int(t_channels * rate)
        self.encoder = _conv_stack(nn.Conv2d, [s_channels, s_channels, factor, factor], use_bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


class FTTerm(DistillTerm):
    """Factor transfer on the last stage outputs (see the module docstring).

    Args:
        weight: weight of the factor loss in the main training (the benchmark's 200).
        rate: factor channels as a fraction of the teacher's (0.5).
        p1, p2: the factor map's power and the distance's power (2 and 1: an L1 distance).
        init_epochs: length of the paraphraser's phase (the benchmark's ``init_epochs``, 30).
    """

    name = "ft"
    reads_teacher = frozenset({"stages"})

    def __init__(self, weight: float = 200.0, rate: float = 0.5, p1: float = 2.0, p2: int = 1, init_epochs: int = 30):
        super().__init__(weight)
        checks.fraction("FTTerm", "rate", rate)
        checks.positive("FTTerm", "p1", p1)
        checks.positive_int("FTTerm", "p2", p2)
        checks.positive_int("FTTerm", "init_epochs", init_epochs)
        self.rate, self.p1, self.p2, self.init_epochs = rate, p1, p2, init_epochs
        self.paraphraser: Paraphraser | None = None
        self.translator: Translator | None = None

    def build(self, student: StagedOutput, teacher: StagedOutput) -> None:
        c_s, c_t = student.stages[-1].shape[1], teacher.stages[-1].shape[1]
        self.paraphraser = Paraphraser(c_t, self.rate)
        self.translator = Translator(c_s, c_t, self.rate)

    def init_modules(self) -> list[nn.Module]:
        return [self.paraphraser]

    def init_loss(self, student: StagedOutput | None, teacher: StagedOutput) -> torch.Tensor:
        target = teacher.stages[-1].detach()
        with torch.autocast(target.device.type, enabled=False):
            _, reconstruction = self.paraphraser(target.float())
            return F.mse_loss(reconstruction, target.float())

    def frozen_after_init(self) -> list[nn.Module]:
        return [self.paraphraser]

    def forward(
        self, student: StagedOutput, teacher: StagedOutput, target: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        factor_t, _ = self.paraphraser(teacher.stages[-1].detach())
        return ft_loss(self.translator(student.stages[-1]), factor_t, self.p1, self.p2)
