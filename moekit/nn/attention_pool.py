"""Multi-head self-attention over a token set or a feature map (pre-LayerNorm, residual).

The ODIR study applies it to the backbone's last feature map before global pooling: every
position attends to every other, ``y = x + Proj(MHSA(LN(x)))`` with 8 heads (Vaswani et al.
2017; pre-norm as in ViT, Dosovitskiy et al. 2021). :class:`TokenSelfAttention` works on
tokens ``[B, N, C]`` (a transformer's token set, class token included), and
:class:`SpatialSelfAttention` on a CNN map ``[B, C, H, W]`` (its ``H·W`` positions as tokens);
both have the same parameters. Attention runs through ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

from einops import rearrange
from torch import Tensor, nn
from torch.nn import functional as F


class TokenSelfAttention(nn.Module):
    """``[B, N, C] -> [B, N, C]``: residual multi-head self-attention over the ``N`` tokens.

    Args:
        channels: ``C`` (divisible by ``num_heads``).
        num_heads: attention heads (8).
        dropout: attention-weight dropout during training.
        qkv_bias: biases on the query/key/value projection.
    """

    def __init__(
        self, channels: int, num_heads: int = 8, dropout: float = 0.0, qkv_bias: bool = True
    ) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(
                f"{type(self).__name__}: {channels} channels do not split into {num_heads} heads"
            )
        self.num_heads = num_heads
        self.dropout = dropout
        self.norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias)
        self.proj = nn.Linear(channels, channels)

    def forward(self, tokens: Tensor) -> Tensor:
        q, k, v = rearrange(
            self.qkv(self.norm(tokens)),
            "b n (three heads d) -> three b heads n d",
            three=3,
            heads=self.num_heads,
        )
        attended = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0
        )
        return tokens + self.proj(rearrange(attended, "b heads n d -> b n (heads d)"))


class SpatialSelfAttention(TokenSelfAttention):
    """``[B, C, H, W] -> [B, C, H, W]``: :class:`TokenSelfAttention` over the H·W positions."""

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        tokens = super().forward(rearrange(x, "b c h w -> b (h w) c"))
        return rearrange(tokens, "b (h w) c -> b c h w", h=height, w=width)
