"""Atrous Spatial Pyramid Pooling (Chen et al., DeepLabV3 2017 / DeepLabV3+, ECCV 2018).

Five parallel branches on the backbone's last feature map, each giving ``out_channels`` with
BatchNorm + ReLU: a ``1×1`` convolution, three ``3×3`` atrous separable convolutions
(:class:`~moekit.nn.dsconv.DSConv`, dilations 6/12/18 at output stride 16) and image pooling
(global average → ``1×1`` conv → upsampled back). They are concatenated (``5·out_channels``)
and projected to ``out_channels`` by a ``1×1`` conv + BatchNorm + ReLU + dropout.

The IDRiD paper shares one ASPP (2048 → 256) between its segmentation experts; its projection
has no dropout (``dropout=0``). torchvision's DeepLabV3 uses 0.5, the default here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from moekit.nn.dsconv import DSConv


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ImagePooling(nn.Module):
    """ASPP's image-level branch: global average pool → 1×1 conv (with bias) → ReLU → upsample.

    Unlike DeepLabV3+'s BatchNorm here, which sees one value per channel and sample and so fails
    on a training batch with a single image (a multi-task batch often holds one segmentation
    image), the branch has no normalisation.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1), nn.ReLU(inplace=True))

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.conv(F.adaptive_avg_pool2d(x, 1))
        return F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """ASPP with separable atrous branches: ``[B, C_in, H, W] -> [B, out_channels, H, W]``.

    Args:
        in_channels: backbone channels (2048 for ResNet-50).
        out_channels: channels of every branch and of the output (256).
        rates: dilations of the separable ``3×3`` branches (6, 12, 18 at output stride 16;
            double them at output stride 8).
        dropout: dropout after the projection.
    """

    def __init__(
        self,
        in_channels: int = 2048,
        out_channels: int = 256,
        rates: Sequence[int] = (6, 12, 18),
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        branches: list[nn.Module] = [_conv_bn_relu(in_channels, out_channels)]
        branches += [DSConv(in_channels, out_channels, 3, dilation=int(r)) for r in rates]
        branches.append(ImagePooling(in_channels, out_channels))
        self.branches = nn.ModuleList(branches)
        self.project = nn.Sequential(
            _conv_bn_relu(len(branches) * out_channels, out_channels), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([branch(x) for branch in self.branches], dim=1))
