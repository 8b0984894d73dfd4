"""Depthwise separable convolution (Chollet, "Xception", CVPR 2017).

A ``k×k`` depthwise convolution (one filter per input channel, with stride and dilation)
followed by a ``1×1`` pointwise convolution that mixes channels, with no non-linearity in
between (as in Xception). It costs ``C_in·k² + C_in·C_out`` weights instead of
``C_in·C_out·k²``. The IDRiD paper replaces every convolution with ``k > 1`` in its heads by this
block; DeepLabV3+ (Chen et al., ECCV 2018) uses its dilated ("atrous separable") form.
"""

from __future__ import annotations

from torch import Tensor, nn


class DSConv(nn.Module):
    """Depthwise ``k×k`` (stride, dilation) → pointwise ``1×1`` → optional BatchNorm and ReLU.

    Args:
        in_channels, out_channels: channels in and out.
        kernel_size: depthwise kernel size ``k`` (odd; padding keeps the size at stride 1).
        stride: depthwise stride.
        dilation: depthwise dilation (padding ``dilation·(k−1)/2``).
        norm: BatchNorm after the pointwise convolution.
        act: ReLU at the end.
        bias: biases on both convolutions; default ``not norm`` (a bias before BatchNorm is
            redundant). The reference code's ``DepthwiseSeparableConv`` has biases and no norm
            of its own.

    Shapes: ``[B, C_in, H, W] -> [B, C_out, ⌈H/stride⌉, ⌈W/stride⌉]``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        norm: bool = True,
        act: bool = True,
        bias: bool | None = None,
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"DSConv: kernel_size must be odd, got {kernel_size}")
        bias = not norm if bias is None else bias
        self.depthwise = nn.Conv2d(
            in_channels,
            in_channels,
            kernel_size,
            stride=stride,
            padding=dilation * (kernel_size - 1) // 2,
            dilation=dilation,
            groups=in_channels,
            bias=bias,
        )
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=bias)
        self.norm = nn.BatchNorm2d(out_channels) if norm else nn.Identity()
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.pointwise(self.depthwise(x))))
