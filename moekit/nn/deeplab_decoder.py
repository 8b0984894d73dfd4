"""DeepLabV3+ decoder (Chen et al., ECCV 2018) as a segmentation expert of the IDRiD paper.

The decoder refines the ASPP output with low-level backbone features::

    low  [B, 256, H/4,  W/4 ] --1×1 conv-BN-ReLU--> [B, 64, H/4, W/4] ---------.
    high [B, 256, H/16, W/16] --bilinear to H/4--------------------------> concat [B, 320]
        --> DSConv 3×3 (320→256) BN ReLU --> Dropout 0.5 --> 1×1 conv --> [B, C, H/4, W/4]
        --> bilinear to out_size (optional)

The paper projects the low-level features to 48 channels; the paper uses 64 (the default here).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from moekit.nn.dsconv import DSConv
from moekit.registry import EXPERTS


@EXPERTS.register("deeplab_decoder")
class DeepLabDecoder(nn.Module):
    """DeepLabV3+ decoder with a separable 3×3 conv: (ASPP output, low-level features) → logits.

    Args:
        num_classes: output channels (1 for a binary lesion mask).
        high_channels: channels of the ASPP output.
        low_channels: channels of the low-level features (ResNet stage 1: 256).
        low_proj_channels: the low-level projection (48 in the paper, 64 in the reference code).
        channels: width of the fusion convolution.
        dropout: dropout before the classifier.

    ``forward(high, low, out_size=None)``: ``high [B, high_channels, h, w]``, ``low
    [B, low_channels, H', W']``; returns logits ``[B, num_classes, *out_size]``, or at the
    low-level resolution when ``out_size`` is ``None``. Upsampling is linear, so a mixture of
    experts may combine low-resolution logits and upsample once.
    """

    def __init__(
        self,
        num_classes: int = 1,
        high_channels: int = 256,
        low_channels: int = 256,
        low_proj_channels: int = 64,
        channels: int = 256,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.project_low = nn.Sequential(
            nn.Conv2d(low_channels, low_proj_channels, 1, bias=False),
            nn.BatchNorm2d(low_proj_channels),
            nn.ReLU(inplace=True),
        )
        self.fuse = DSConv(high_channels + low_proj_channels, channels, 3)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, high: Tensor, low: Tensor, out_size: Sequence[int] | None = None) -> Tensor:
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=False)
        x = torch.cat([high, self.project_low(low)], dim=1)
        logits = self.classifier(self.dropout(self.fuse(x)))
        if out_size is not None and tuple(out_size) != tuple(logits.shape[-2:]):
            logits = F.interpolate(
                logits, size=tuple(out_size), mode="bilinear", align_corners=False
            )
        return logits
