"""M4oE's task heads: on a task's fused feature, and (segmentation) on a modality's feature map.

A head maps the fused feature ``f [r, C_f]`` of a task's rows to predictions (``C_f`` is the
model's width ``C``, or ``M·C`` for a fusion that concatenates the modalities' features).
Classification and regression heads read ``f`` alone; a segmentation head decodes the token map
of one spatial modality's encoder (e.g. the fundus image for GAMMA's optic disc and cup)
conditioned on ``f``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class LinearTaskHead(nn.Module):
    """``dropout -> linear`` on the task's fused feature: ``[r, C] -> [r, K]`` (as M4oE's
    heads on the fusion block's first token)."""

    dense = False

    def __init__(self, dim: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, out_channels)

    def output_shape(self, size: tuple[int, int] | None = None) -> tuple[int, ...]:
        return (self.fc.out_features,)

    def forward(self, fused: Tensor) -> Tensor:
        return self.fc(self.drop(fused))


class FiLMDecoderHead(nn.Module):
    """Segmentation of ``modality``: its encoder's token map ``m [r, C, h, w]`` modulated by
    the task's fused feature ``f [r, C_f]``, then decoded to the modality's input size.

    ``m' = m ⊙ (1 + γ(f)) + β(f)`` (FiLM, Perez et al., AAAI 2018; ``γ, β`` linear in ``f``,
    initialised to zero so training starts from an unconditioned decoder), then 3×3 conv-BN-ReLU
    twice, a 1×1 conv to ``K`` logits and bilinear upsampling to ``(H, W)``.
    """

    dense = True

    def __init__(
        self,
        dim: int,
        out_channels: int,
        modality: str,
        hidden: int = 64,
        fused_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.modality, self.out_channels = modality, out_channels
        self.film = nn.Linear(fused_dim or dim, 2 * dim)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        self.decoder = nn.Sequential(
            nn.Conv2d(dim, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1),
        )

    def output_shape(self, size: tuple[int, int] | None = None) -> tuple[int, ...]:
        return (self.out_channels, *(size or ()))

    def forward(self, fused: Tensor, feature_map: Tensor, size: tuple[int, int]) -> Tensor:
        """``fused [r, C_f]``, ``feature_map [r, C, h, w]`` -> logits ``[r, K, H, W]``."""
        gamma, beta = self.film(fused)[:, :, None, None].chunk(2, dim=1)
        x = self.decoder(feature_map * (1 + gamma) + beta)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


HEAD_TYPES: dict[str, type[nn.Module]] = {"linear": LinearTaskHead, "film_decoder": FiLMDecoderHead}
