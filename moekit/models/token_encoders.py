"""Token encoders (registry ``BACKBONES``): one modality's input -> ``dim``-wide tokens.

A token encoder is built with the model's token width ``dim`` and maps its input to
``(tokens [B, N, dim], grid)``, where ``grid = (h, w)`` when the ``N`` tokens are a 2-D map in
row-major order (a CNN feature map, a ViT's patch grid) and ``None`` otherwise; ``spatial``
says which a model can expect before it runs. Multi-modal models (M4oE) build one per
modality.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from moekit.errors import ConfigError
from moekit.models.backbones import TimmFeatures
from moekit.registry import BACKBONES

Grid = tuple[int, int] | None


@BACKBONES.register("timm_tokens")
class TimmTokens(nn.Module):
    """A timm model's feature map as tokens, projected to ``dim`` by a linear layer.

    The map of stage ``stage`` (:class:`~moekit.models.backbones.TimmFeatures`, so any timm
    family: a CNN stage, a ViT block's patch tokens on their grid, Swin's maps) ``[B, C, h,
    w]`` becomes ``h·w`` tokens in row-major order.

    Args:
        dim: token width of the model.
        name: a timm model name (``resnet18``, ``vit_small_patch16_224``, ...).
        stage: the feature stage (``out_indices`` entry; ``-1``: the last).
        in_chans: input channels.
        pretrained: a local weights file, ``true`` (timm's hub) or ``null``.
        timm_kwargs: further ``timm.create_model`` arguments (``img_size`` for a ViT...).
    """

    spatial = True

    def __init__(
        self,
        dim: int,
        name: str = "resnet18",
        stage: int = -1,
        in_chans: int = 3,
        pretrained: str | bool | None = None,
        timm_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.features = TimmFeatures(
            name,
            out_indices=(stage,),
            pretrained=pretrained,
            timm_kwargs={"in_chans": in_chans, **dict(timm_kwargs or {})},
        )
        self.proj = nn.Linear(self.features.channels[-1], dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Grid]:
        (feature_map,) = self.features(x)
        grid = (int(feature_map.shape[-2]), int(feature_map.shape[-1]))
        return self.proj(feature_map.flatten(2).transpose(1, 2)), grid


@BACKBONES.register("slice_stack")
class SliceStack(nn.Module):
    """A volume ``[B, D, H, W]`` as ``D`` 2-D slices (e.g. OCT B-scans) through one shared 2-D
    token encoder.

    Each slice is encoded alone (repeated to the encoder's ``in_chans``); with ``pool`` its
    tokens are averaged to one token per slice (``D`` tokens), otherwise all are kept
    (``D·n``). ``num_slices`` adds a learned slice-position embedding (the volume must then
    have exactly that many slices).

    Args:
        dim: token width of the model.
        encoder: the 2-D token encoder config (``{type: timm_tokens, name: ..., in_chans: 1}``).
        pool: one token per slice.
        num_slices: ``D`` for a learned slice embedding; ``None``: none.
    """

    spatial = False

    def __init__(
        self,
        dim: int,
        encoder: Mapping[str, Any],
        pool: bool = True,
        num_slices: int | None = None,
    ) -> None:
        super().__init__()
        self.encoder = BACKBONES.build(encoder, dim=dim)
        self.pool, self.num_slices = pool, num_slices
        self.slice_embed = nn.Parameter(torch.zeros(num_slices, dim)) if num_slices else None
        if self.slice_embed is not None:
            nn.init.trunc_normal_(self.slice_embed, std=0.02)

    def forward(self, x: Tensor) -> tuple[Tensor, Grid]:
        if x.dim() != 4:
            raise ValueError(f"slice_stack expects volumes [B, D, H, W], got {tuple(x.shape)}")
        batch, depth = x.shape[:2]
        if self.num_slices and depth != self.num_slices:
            raise ValueError(
                f"slice_stack: volumes have {depth} slices, num_slices is {self.num_slices}"
            )
        in_chans = getattr(self.encoder, "in_chans", 1)
        slices = x.reshape(batch * depth, 1, *x.shape[2:]).expand(-1, in_chans, -1, -1)
        tokens, _ = self.encoder(slices)
        tokens = tokens.view(batch, depth, -1, tokens.shape[-1])
        if self.pool:
            tokens = tokens.mean(dim=2, keepdim=True)
        if self.slice_embed is not None:
            tokens = tokens + self.slice_embed[:, None, :]
        return tokens.flatten(1, 2), None


@BACKBONES.register("conv3d_tokens")
class Conv3dTokens(nn.Module):
    """A 3-D convolutional stem: a volume ``[B, D, H, W]`` (or ``[B, C, D, H, W]``) to
    non-overlapping 3-D patch tokens.

    ``conv3d(3×3×3, hidden) -> BN -> GELU -> conv3d(kernel = stride = patch, dim) -> LN``;
    the tokens are the ``d·h·w`` patches in order.

    Args:
        dim: token width of the model.
        patch: patch size ``(p_d, p_h, p_w)``.
        hidden: channels of the first convolution.
        in_chans: volume channels.
    """

    spatial = False

    def __init__(
        self, dim: int, patch: Sequence[int] = (4, 16, 16), hidden: int = 32, in_chans: int = 1
    ) -> None:
        super().__init__()
        patch = tuple(int(p) for p in patch)
        if len(patch) != 3 or min(patch) < 1:
            raise ConfigError(f"conv3d_tokens.patch: expected 3 positive sizes, got {list(patch)}")
        self.in_chans = in_chans
        self.stem = nn.Sequential(
            nn.Conv3d(in_chans, hidden, 3, padding=1, bias=False),
            nn.BatchNorm3d(hidden),
            nn.GELU(),
            nn.Conv3d(hidden, dim, kernel_size=patch, stride=patch),
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Grid]:
        volume = x.unsqueeze(1) if x.dim() == 4 else x
        if volume.dim() != 5 or volume.shape[1] != self.in_chans:
            raise ValueError(
                f"conv3d_tokens expects [B, D, H, W] or [B, {self.in_chans}, D, H, W], got "
                f"{tuple(x.shape)}"
            )
        return self.norm(self.stem(volume).flatten(2).transpose(1, 2)), None
