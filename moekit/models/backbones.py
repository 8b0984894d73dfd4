"""Backbones from timm (registry ``BACKBONES``), with offline pretrained weights.

Weights come from a local file unless asked otherwise: ``pretrained: PATH`` reads a
safetensors file or a PyTorch state dict (``weights_only=True``), passed to timm as
``pretrained_cfg_overlay=dict(file=path)``; ``pretrained: true`` hands the download to timm's
own hub (for users online; nothing in moekit's tests or demos downloads); ``null``/``false``
starts from random weights.

Every timm family is accepted — CNNs (ResNet, EfficientNet, ConvNeXt...) and transformers
(ViT, Swin...) — under one contract: a backbone returns feature maps ``[B, C, H, W]``.
Transformer tokens come back on their patch grid (timm drops ViT's class token and turns
Swin's channels-last maps channels-first), so any head written for CNN maps works on them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
from timm.layers import Format
from torch import Tensor, nn

from moekit.errors import ConfigError, did_you_mean
from moekit.registry import BACKBONES


def check_weights_file(path: str | None, what: str) -> str | None:
    """Return ``path`` if it is an existing file; a clear error otherwise."""
    if path is None:
        return None
    if not Path(path).is_file():
        raise ConfigError(f"{what}: pretrained weights file '{path}' not found (no downloads)")
    return str(path)


def pretrained_kwargs(pretrained: str | bool | None, what: str) -> dict[str, Any]:
    """``timm.create_model`` arguments for ``pretrained``: a local file (checked), ``true``
    (timm's own hub download) or ``null``/``false`` (random weights)."""
    if pretrained is None or pretrained is False:
        return {"pretrained": False}
    if pretrained is True:
        return {"pretrained": True}
    if not isinstance(pretrained, str | Path):
        raise ConfigError(f"{what}: expected a weights file, true or null, got {pretrained!r}")
    weights = check_weights_file(str(pretrained), what)
    return {"pretrained": True, "pretrained_cfg_overlay": {"file": weights}}


def check_timm_name(name: str, what: str) -> None:
    """A clear error (with a "did you mean") for a model name timm does not know."""
    if name not in timm.list_models():
        suggestion = did_you_mean(name, timm.list_models())
        raise ConfigError(f"{what}: timm has no model '{name}'{suggestion}")


@BACKBONES.register("timm_features")
class TimmFeatures(nn.Module):
    """A timm model as a feature pyramid: ``images -> [maps [B, C, H, W] at out_indices]``.

    ``resnet50`` with ``output_stride=16, out_indices=(1, 4)`` gives the IDRiD paper's stage-1
    low-level features (256 ch, stride 4) and dilated stage-4 features (2048 ch, stride 16);
    ``vit_base_patch16_224`` with ``out_indices=(-1,)`` and ``timm_kwargs={img_size: 64}`` the
    last block's tokens as a ``[B, 768, 4, 4]`` map.

    Args:
        name: any timm model with ``features_only`` support.
        output_stride: dilate the last stages down to this stride (CNNs that support it);
            ``None`` keeps the model's own stride. Transformers have none to change.
        out_indices: the stages (blocks for ViT) to return; negative counts from the end.
        pretrained: a local weights file, ``true`` (timm's hub download) or ``None``.
        timm_kwargs: further ``timm.create_model`` arguments (``img_size`` for ViT/Swin at
            another resolution, ``drop_path_rate``...).
    """

    def __init__(
        self,
        name: str = "resnet50",
        output_stride: int | None = None,
        out_indices: Sequence[int] = (1, 4),
        pretrained: str | bool | None = None,
        timm_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        weights = pretrained_kwargs(pretrained, "model.backbone.pretrained")
        check_timm_name(name, "model.backbone.name")
        kwargs = dict(timm_kwargs or {})
        if output_stride is not None:
            kwargs["output_stride"] = int(output_stride)
        try:
            self.body = timm.create_model(
                name, features_only=True, out_indices=tuple(out_indices), **weights, **kwargs
            )
        except TypeError as exc:
            if "output_stride" in str(exc):
                raise ConfigError(
                    f"model.backbone.output_stride: timm model '{name}' has no output_stride "
                    "(transformers keep their patch stride); leave it unset"
                ) from None
            raise
        self.channels_last = Format(getattr(self.body, "output_fmt", "NCHW")) == Format.NHWC
        self.channels: list[int] = self.body.feature_info.channels()
        self.reductions: list[int] = self.body.feature_info.reduction()

    def forward(self, images: Tensor) -> list[Tensor]:
        features = self.body(images)
        if self.channels_last:
            return [f.permute(0, 3, 1, 2) for f in features]
        return list(features)
