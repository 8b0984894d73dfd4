"""Token encoders (registry ``BACKBONES``): one modality's input -> ``dim``-wide tokens.

A token encoder is built with the model's token width ``dim`` and maps its input to
``(tokens [B, N, dim], grid)``, where ``grid = (h, w)`` when the ``N`` tokens are a 2-D map in
row-major order (a CNN feature map, a ViT's patch grid) and ``None`` otherwise; ``spatial``
says which a model can expect before it runs. Multi-modal models (M4oE) build one per
modality. Weights never download: ``pretrained`` is a local file (see
:func:`moekit.models.backbones.check_weights_file`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import timm
import torch
from torch import Tensor, nn

from moekit.errors import ConfigError, did_you_mean
from moekit.models.backbones import check_weights_file
from moekit.registry import BACKBONES

Grid = tuple[int, int] | None


@BACKBONES.register("timm_tokens")
class TimmTokens(nn.Module):
    """Any timm model as a token encoder, projected to ``dim`` by a linear layer.

    A CNN's feature map ``[B, C, h, w]`` (the last stage, or ``stage`` of its feature
    pyramid) becomes ``h·w`` tokens in row-major order; a transformer's tokens are its patch
    tokens (class/register tokens dropped), with their patch grid. NHWC outputs (Swin,
    MambaOut) are read as such.

    Args:
        dim: token width of the model.
        name: a timm model name (``resnet18``, ``vit_small_patch16_224``, ...).
        in_chans: input channels.
        pretrained: a local weights file (no downloads).
        stage: a CNN stage index (timm ``features_only`` ``out_indices``); ``None``: the
            model's final features.
        model_kwargs: extra ``timm.create_model`` arguments (e.g. ``img_size`` for a ViT).
    """

    spatial = True

    def __init__(
        self,
        dim: int,
        name: str = "resnet18",
        in_chans: int = 3,
        pretrained: str | None = None,
        stage: int | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        weights = check_weights_file(pretrained, f"encoder '{name}'.pretrained")
        if name not in timm.list_models():
            raise ConfigError(
                f"encoder name: timm has no model '{name}'{did_you_mean(name, timm.list_models())}"
            )
        common = dict(
            in_chans=in_chans,
            pretrained=weights is not None,
            pretrained_cfg_overlay=dict(file=weights) if weights else None,
            **dict(model_kwargs or {}),
        )
        if stage is None:
            self.body = timm.create_model(name, num_classes=0, global_pool="", **common)
            channels = self.body.num_features
        else:
            self.body = timm.create_model(name, features_only=True, out_indices=(stage,), **common)
            channels = self.body.feature_info.channels()[-1]
        self.in_chans, self.stage = in_chans, stage
        self.channels_last = getattr(self.body, "output_fmt", "NCHW") == "NHWC"
        self.num_prefix_tokens = int(getattr(self.body, "num_prefix_tokens", 0) or 0)
        self.proj = nn.Linear(channels, dim)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)[0] if self.stage is not None else self.body.forward_features(x)

    def patch_grid(self, x: Tensor, count: int) -> Grid:
        """The patch grid of a transformer's ``count`` tokens, when it has one."""
        patch_embed = getattr(self.body, "patch_embed", None)
        if patch_embed is None or not hasattr(patch_embed, "dynamic_feat_size"):
            return None
        h, w = (int(s) for s in patch_embed.dynamic_feat_size(tuple(x.shape[-2:])))
        return (h, w) if h * w == count else None

    def forward(self, x: Tensor) -> tuple[Tensor, Grid]:
        features = self.features(x)
        if features.dim() == 4:
            if not self.channels_last:
                features = features.permute(0, 2, 3, 1)
            grid = (int(features.shape[1]), int(features.shape[2]))
            return self.proj(features.flatten(1, 2)), grid
        tokens = features[:, self.num_prefix_tokens :]
        return self.proj(tokens), self.patch_grid(x, tokens.shape[1])


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
