"""FT: factor transfer (Kim et al., NeurIPS 2018, "Paraphrasing Complex Network").

Only the pure pieces: the paraphraser (an autoencoder of the teacher's last stage output, trained
on its reconstruction in an initialisation phase), the student's translator and the factor loss
(weight 200 in the CRD benchmark). The init phase belongs to the stage mechanism, not to a term.
"""

from __future__ import annotations

import torch
from torch import nn

from .at import attention_map
from .maps import pool_to_smaller


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
