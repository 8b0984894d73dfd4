"""Convolutional stem for a ViT (Xiao et al., "Early Convolutions Help Transformers See
Better", NeurIPS 2021).

In place of the ``p×p`` stride-``p`` patchify convolution, ``m = log2(p)`` stride-2 ``3×3``
convolutions, each followed by BatchNorm and ReLU, bring the image to the same ``H/p × W/p``
token grid, and a ``1×1`` convolution (``proj``) maps to the token width. Channel widths double
from ``dim / 2^(m-1)`` up to ``dim``:

    [B, 3, H, W] → conv3×3/2 → … → [B, dim, H/p, W/p] → conv1×1 → tokens [B, HW/p², dim]

The stem adds the translation equivariance and local contrast features a linear patch
embedding has to learn from data; Xiao et al. report faster and more stable optimisation at
the same FLOPs. moekit's CPU-sized Mod-Squad configs use it (``model.patch_embed: conv``),
because a tiny ViT with a linear patch embedding does not learn MultiTaskShapes' shape classes
in CPU minutes (docs/modsquad.md).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from moekit.errors import ConfigError


def stem_widths(patch_size: int, dim: int) -> list[int]:
    """Output channels of the stride-2 convolutions: ``dim / 2^(m-1-i)`` for ``i < m``."""
    if patch_size < 2 or patch_size & (patch_size - 1):
        raise ConfigError(
            f"model.patch_embed: a conv stem needs a power-of-two patch_size >= 2, got {patch_size}"
        )
    stages = patch_size.bit_length() - 1
    smallest = 1 << (stages - 1)
    if dim < 1 or dim % smallest:
        raise ConfigError(
            f"model.patch_embed: a conv stem with patch_size {patch_size} needs dim divisible "
            f"by {smallest}, got {dim}"
        )
    return [dim >> (stages - 1 - i) for i in range(stages)]


class ConvStemPatchEmbed(nn.Module):
    """Tokens from a convolutional stem; the interface of timm's ``PatchEmbed``
    (``grid_size``, ``num_patches``, ``[B, C, H, W] -> [B, N, dim]``).

    Args:
        img_size: ``(H, W)``, multiples of ``patch_size``.
        patch_size: total stride ``p``, a power of two.
        in_chans: image channels.
        dim: token width.
    """

    def __init__(self, img_size: Sequence[int], patch_size: int, in_chans: int, dim: int):
        super().__init__()
        height, width = (int(s) for s in img_size)
        if height % patch_size or width % patch_size:
            raise ConfigError(
                f"model.img_size: {height}x{width} is not a multiple of patch_size {patch_size}"
            )
        self.grid_size = (height // patch_size, width // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        layers: list[nn.Module] = []
        channels = in_chans
        for out in stem_widths(patch_size, dim):
            layers += [
                nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
            ]
            channels = out
        self.stem = nn.Sequential(*layers)
        self.proj = nn.Conv2d(channels, dim, 1)

    def forward(self, images: Tensor) -> Tensor:
        return self.proj(self.stem(images)).flatten(2).transpose(1, 2)
