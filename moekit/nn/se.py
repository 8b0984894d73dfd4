"""Squeeze-and-Excitation channel attention (Hu et al., CVPR 2018).

``s = sigmoid(W2 ReLU(W1 GAP(x)))`` with ``W1: C → C/r`` and ``W2: C/r → C`` (``r = 16``);
the output is ``x · s`` (each channel rescaled). The ODIR study inserts it on the backbone's
last feature map before pooling. :class:`SqueezeExcitation` takes CNN maps ``[B, C, H, W]``
(GAP over the positions), :class:`TokenSqueezeExcitation` token sets ``[B, N, C]`` (the mean
over the tokens); both have the same parameters.
"""

from __future__ import annotations

from torch import Tensor, nn


class SqueezeExcitation(nn.Module):
    """``[B, C, H, W] -> [B, C, H, W]``: channels rescaled by a learned gate in (0, 1).

    Args:
        channels: ``C``.
        reduction: ``r``; the bottleneck has ``max(1, C // r)`` units.
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.gate = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        weights = self.gate(x.mean(dim=(2, 3)))
        return x * weights[:, :, None, None]


class TokenSqueezeExcitation(SqueezeExcitation):
    """``[B, N, C] -> [B, N, C]``: the channel gate squeezed from the mean over the tokens."""

    def forward(self, tokens: Tensor) -> Tensor:
        return tokens * self.gate(tokens.mean(dim=1))[:, None, :]
