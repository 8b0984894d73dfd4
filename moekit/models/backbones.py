"""Backbones from timm (registry ``BACKBONES``), with offline pretrained weights.

Weights never download: ``pretrained`` is a path to a local file (safetensors or a PyTorch
state dict, read with ``weights_only=True``), passed to timm as
``pretrained_cfg_overlay=dict(file=path)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import timm
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


@BACKBONES.register("timm_features")
class TimmFeatures(nn.Module):
    """A timm CNN as a feature pyramid: ``images -> [features at out_indices]``.

    ``resnet50`` with ``output_stride=16, out_indices=(1, 4)`` gives the IDRiD seed's stage-1
    low-level features (256 ch, stride 4) and dilated stage-4 features (2048 ch, stride 16).
    """

    def __init__(
        self,
        name: str = "resnet50",
        output_stride: int = 16,
        out_indices: Sequence[int] = (1, 4),
        pretrained: str | None = None,
    ) -> None:
        super().__init__()
        weights = check_weights_file(pretrained, "model.backbone.pretrained")
        if name not in timm.list_models():
            suggestion = did_you_mean(name, timm.list_models())
            raise ConfigError(f"model.backbone.name: timm has no model '{name}'{suggestion}")
        self.body = timm.create_model(
            name,
            features_only=True,
            output_stride=output_stride,
            out_indices=tuple(out_indices),
            pretrained=weights is not None,
            pretrained_cfg_overlay=dict(file=weights) if weights else None,
        )
        self.channels: list[int] = self.body.feature_info.channels()
        self.reductions: list[int] = self.body.feature_info.reduction()

    def forward(self, images: Tensor) -> list[Tensor]:
        return self.body(images)
