"""The IDRiD paper's classification expert: pool, separable conv, MLP.

ResNet-50 at output stride 16 leaves a large feature map (45×67 for 712×1072 inputs); the paper
first pools it to a fixed 11×16, then learns classification features with a strided separable
convolution that halves the channels, and ends with a small MLP::

    [B, 2048, H, W] -> AdaptiveAvgPool(11×16) -> DSConv 3×3 stride 2 (2048→1024)
        -> global average pool -> Linear(1024, 256) -> ReLU -> Dropout 0.5 -> Linear(256, C)
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from moekit.nn.dsconv import DSConv
from moekit.registry import EXPERTS


@EXPERTS.register("dsconv_cls")
class DSConvClassifier(nn.Module):
    """Classification expert of the IDRiD paper: ``[B, in_channels, H, W] -> [B, num_classes]``.

    Args:
        num_classes: classes (5 for ``rg``, 3 for ``mer``).
        in_channels: backbone channels (2048).
        mid_channels: output of the separable convolution (1024 = in/2 in the paper).
        hidden: width of the MLP's hidden layer (256).
        pool_size: ``(h, w)`` of the first adaptive average pool (11×16).
        dropout: dropout in the MLP (0.5).
        norm: BatchNorm + ReLU after the separable convolution (the paper's has neither).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 2048,
        mid_channels: int = 1024,
        hidden: int = 256,
        pool_size: Sequence[int] = (11, 16),
        dropout: float = 0.5,
        norm: bool = False,
    ) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(tuple(pool_size))
        self.conv = DSConv(in_channels, mid_channels, 3, stride=2, norm=norm, act=norm)
        self.mlp = nn.Sequential(
            nn.Flatten(),
            nn.Linear(mid_channels, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(self.pool(x))
        return self.mlp(x.mean(dim=(2, 3), keepdim=True))
