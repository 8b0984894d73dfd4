"""Task heads on ViT tokens (registry ``HEADS``).

Every head takes the same constructor arguments so a model can build any of them for any
task: ``dim`` (token width), ``out_channels`` (classes or regression channels),
``patch_size`` and ``grid`` (the token grid ``(h, w)``). Heads map patch tokens
``[R, N, C]`` (no class token) to ``[R, out]`` (image-level) or ``[R, out, H, W]`` (dense).
"""

from __future__ import annotations

from einops import rearrange
from torch import Tensor, nn
from torch.nn import functional as F

from moekit.registry import HEADS


@HEADS.register("linear")
class LinearHead(nn.Module):
    """Linear classifier on mean-pooled patch tokens (Mod-Squad's Taskonomy heads)."""

    dense = False

    def __init__(self, dim: int, out_channels: int, patch_size: int, grid: tuple[int, int]):
        super().__init__()
        self.fc = nn.Linear(dim, out_channels)

    def output_shape(self) -> tuple[int, ...]:
        return (self.fc.out_features,)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.fc(tokens.mean(dim=1))


@HEADS.register("patch_decoder")
class PatchDecoderHead(nn.Module):
    """Per-token linear map to the token's patch of pixels, folded back into an image.

    ``y[:, :, i·p:(i+1)·p, j·p:(j+1)·p] = reshape(W t_{ij} + b)`` — the dense Taskonomy heads of
    Mod-Squad (Chen et al., CVPR 2023): one linear layer, no spatial mixing.
    """

    dense = True

    def __init__(self, dim: int, out_channels: int, patch_size: int, grid: tuple[int, int]):
        super().__init__()
        self.patch_size, self.grid, self.out_channels = patch_size, tuple(grid), out_channels
        self.proj = nn.Linear(dim, out_channels * patch_size * patch_size)

    def output_shape(self) -> tuple[int, ...]:
        h, w = self.grid
        return (self.out_channels, h * self.patch_size, w * self.patch_size)

    def forward(self, tokens: Tensor) -> Tensor:
        h, w = self.grid
        p = self.patch_size
        return rearrange(
            self.proj(tokens), "r (h w) (c p1 p2) -> r c (h p1) (w p2)", h=h, w=w, p1=p, p2=p
        )


@HEADS.register("conv_decoder")
class ConvDecoderHead(nn.Module):
    """A light multi-layer dense head: tokens as a feature map, 3×3 conv-BN-ReLU twice, 1×1
    projection, bilinear upsampling to the image size (in the spirit of M³ViT's PASCAL heads)."""

    dense = True

    def __init__(
        self,
        dim: int,
        out_channels: int,
        patch_size: int,
        grid: tuple[int, int],
        hidden: int = 128,
    ):
        super().__init__()
        self.patch_size, self.grid, self.out_channels = patch_size, tuple(grid), out_channels
        self.layers = nn.Sequential(
            nn.Conv2d(dim, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1),
        )

    def output_shape(self) -> tuple[int, ...]:
        h, w = self.grid
        return (self.out_channels, h * self.patch_size, w * self.patch_size)

    def forward(self, tokens: Tensor) -> Tensor:
        h, w = self.grid
        x = rearrange(tokens, "r (h w) c -> r c h w", h=h, w=w)
        x = self.layers(x)
        size = (h * self.patch_size, w * self.patch_size)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def default_head_type(dense: bool) -> str:
    """The head a task gets when its config names none."""
    return "conv_decoder" if dense else "linear"


def scatter_rows(rows: Tensor, index: Tensor, batch_size: int) -> Tensor:
    """Place ``rows [r, ...]`` at ``index [r]`` of a zero tensor with ``batch_size`` rows.

    Out of place (``index_put``), so gradients flow back to ``rows``; rows that were not
    computed stay zero and are masked out by the losses (docs/architecture.md).
    """
    out = rows.new_zeros((batch_size, *rows.shape[1:]))
    return out.index_put((index,), rows)
