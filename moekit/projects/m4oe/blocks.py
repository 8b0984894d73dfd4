"""M4oE's transformer block: attention with a key mask, then an MLP that may be any MoE layer.

One block class serves the three places M4oE uses transformer blocks (Wu et al., ICLR 2025):
the per-modality MSoE blocks, the MToE block over all modalities' tokens with task-specific
routing, and the per-task fusion block. Masked tokens (an absent modality) serve as no key, are
routed nowhere and are excluded from pooling, so they cannot influence a present token.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models.vision_transformer import Attention
from torch import Tensor, nn

from moekit.errors import ConfigError
from moekit.moe import MoELayer, SoftMoE
from moekit.registry import MOE_LAYERS
from moekit.routing.types import RoutingRecord


def key_mask(valid: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Additive attention mask ``[B, 1, 1, N]``: 0 for valid keys, ``-inf`` for masked ones.

    A sequence without a valid token attends to all its keys (its outputs are masked
    downstream); this only keeps the softmax finite.
    """
    if valid is None:
        return None
    keys = valid | ~valid.any(dim=1, keepdim=True)
    mask = torch.zeros(keys.shape, dtype=dtype, device=valid.device)
    return mask.masked_fill(~keys, float("-inf"))[:, None, None, :]


def masked_mean(x: Tensor, valid: Tensor | None) -> Tensor:
    """Mean of ``x [R, N, C]`` over the valid tokens of each row (``valid [R, N]``); a row
    without valid tokens gives 0. Masked positions are never read."""
    if valid is None:
        return x.mean(dim=1)
    total = x.masked_fill(~valid.unsqueeze(-1), 0.0).sum(dim=1)
    return total / valid.sum(dim=1, keepdim=True).clamp_min(1).to(x.dtype)


def build_mlp(
    moe: Mapping[str, Any] | None,
    dim: int,
    mlp_ratio: float,
    num_tasks: int,
    task_embedding: bool,
) -> nn.Module:
    """The block's MLP: timm's dense ``Mlp`` (``moe`` null) or an ``MOE_LAYERS`` layer.

    An MoE layer's ``hidden`` defaults to ``mlp_ratio·dim / k`` when its router has ``k``
    (FLOP-matched, as in Mod-Squad) and to ``mlp_ratio·dim`` otherwise (each Soft MoE slot
    passes through one expert). A task-slotted Soft MoE layer takes ``task_embedding`` itself.
    """
    if moe is None:
        return Mlp(dim, int(mlp_ratio * dim))
    if not isinstance(moe, Mapping) or "type" not in moe:
        raise ConfigError(f"moe: expected a MOE_LAYERS config with a 'type' key, got {moe!r}")
    cfg = dict(moe)
    if "hidden" not in cfg:
        k = (cfg.get("router") or {}).get("k")
        cfg["hidden"] = int(mlp_ratio * dim / k) if k else int(mlp_ratio * dim)
    extra = {"task_embedding": task_embedding} if _is_soft(cfg) else {}
    return MOE_LAYERS.build(cfg, dim=dim, num_tasks=num_tasks, **extra)


def _is_soft(cfg: Mapping[str, Any]) -> bool:
    layer = MOE_LAYERS.get(cfg["type"])
    return isinstance(layer, type) and issubclass(layer, SoftMoE)


class MoEBlock(nn.Module):
    """Pre-norm transformer block ``x + Attn(LN(x))``, ``x + MLP(LN(x) [+ e_t])``.

    ``MLP`` is any ``MOE_LAYERS`` layer (``moe_mlp`` with top-k / top-p / noisy top-k routers
    and per-task gates, ``soft_moe``, ...) or a dense MLP. With ``num_tasks > 1`` and
    ``task_embedding``, a token-choice or dense MLP sees ``LN(x) + e_t`` (Mod-Squad's task
    embedding, eq. 4); a Soft MoE layer adds ``e_t`` to its task's slot inputs instead (M4oE).

    Parameter names follow timm's ViT block (``norm1``, ``attn.qkv``, ``attn.proj``,
    ``norm2``, ``mlp``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        moe: Mapping[str, Any] | None = None,
        num_tasks: int = 1,
        task_embedding: bool = False,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = build_mlp(moe, dim, mlp_ratio, num_tasks, task_embedding)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        own_embedding = task_embedding and num_tasks > 1 and not isinstance(self.mlp, SoftMoE)
        self.task_embed = nn.Parameter(torch.zeros(num_tasks, dim)) if own_embedding else None
        if self.task_embed is not None:
            trunc_normal_(self.task_embed, std=0.02)

    def keep_task(self, task: int) -> None:
        """Keep only task ``task``'s embedding (its MoE layer is reduced by
        :func:`moekit.moe.keep_task_routers`)."""
        if self.task_embed is not None:
            self.task_embed = nn.Parameter(self.task_embed.detach()[task : task + 1].clone())

    def forward(
        self,
        x: Tensor,
        records: list[RoutingRecord],
        *,
        valid: Tensor | None = None,
        rows: Tensor | None = None,
        task_ids: Tensor | None = None,
        modality_ids: Tensor | None = None,
    ) -> Tensor:
        """``x [B, N, C]`` with ``valid [B, N]`` (keys and routed tokens) -> ``[R, N, C]``.

        ``rows [R]`` (the sample of each output row) expands the samples into (sample, task)
        rows after attention, so attention runs once per sample; ``task_ids [R]`` are the
        rows' tasks; ``modality_ids [N]`` the modality of each token (for the records).
        """
        x = x + self.drop_path1(self.attn(self.norm1(x), attn_mask=key_mask(valid, x.dtype)))
        if rows is not None:
            x = x.index_select(0, rows)
            valid = None if valid is None else valid.index_select(0, rows)
        h = self.norm2(x)
        if self.task_embed is not None:
            h = h + self.task_embed[task_ids].unsqueeze(1)
        if not isinstance(self.mlp, MoELayer):
            return x + self.drop_path2(self.mlp(h))
        ids = None if modality_ids is None else modality_ids.expand(h.shape[0], -1)
        y, record = self.mlp(h, task_ids, modality_ids=ids, valid=valid)
        records.append(record)
        return x + self.drop_path2(y)
