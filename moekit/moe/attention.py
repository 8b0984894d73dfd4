"""MoE attention (MoA): each expert is one attention head with its own query and output
projections; one key and one value projection are shared by all heads."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from moekit.moe.base import MoELayer, rows_per_token
from moekit.moe.dispatch import DispatchPlan, check_capacity_factor, grouped_linear
from moekit.moe.experts import ExpertLinear
from moekit.registry import MOE_LAYERS
from moekit.routing.types import RoutingRecord


def pack_by_sample(plan: DispatchPlan, tokens_per_sample: int, batch: int) -> tuple[Tensor, int]:
    """A row in a ``[batch * L]`` layout for every pair, grouping the pairs of each sample.

    Pairs keep their token order inside a sample; ``L`` is the largest number of pairs of one
    sample, so the attention cost follows the experts actually selected.
    """
    order = plan.slot.argsort()
    sample = plan.token[order] // tokens_per_sample
    counts = torch.bincount(sample, minlength=batch)
    length = int(counts.max()) if counts.numel() else 0
    starts = counts.cumsum(0) - counts
    rank = torch.arange(len(order), device=order.device) - starts[sample]
    packed = torch.empty_like(order)
    packed[order] = sample * length + rank
    return packed, length


@MOE_LAYERS.register("moe_attention")
class MoEAttention(MoELayer):
    """Mixture of attention heads (Zhang et al., EMNLP 2022, MoA; used by Mod-Squad, CVPR 2023).

    Expert ``e`` is one head with query ``W_q^e [C, d_h]`` and output ``W_o^e [d_h, C]``
    projections; the key and value projections ``W_k, W_v [C, d_h]`` are shared by all heads
    (multi-query style). For token ``t`` of a sequence ``X``:

    ``y_t = sum_{e in S(x_t)} g_e(x_t) * W_o^e softmax((x_t W_q^e)(X W_k)^T / sqrt(d_h)) X W_v``

    Only the selected (token, head) pairs compute a query, an attention row and an output
    projection; the query rows of a sample are packed together so attention costs ``B x L x N``
    with ``L`` the sample's selected pairs.

    Args:
        dim: token size ``C``.
        num_experts: number of heads ``E``.
        head_dim: ``d_h``.
        router: router config without ``dim``/``num_experts``/``num_tasks``.
        num_tasks: number of per-task gates.
        bias: biases on all projections.
        capacity_factor: cap each head at ``ceil(f * pairs / E)`` pairs (dropless if None).
        strategy: dispatch strategy name; None picks the device's.
    """

    expert_modules = ("q_proj", "out_proj")

    def __init__(
        self,
        dim: int,
        num_experts: int,
        head_dim: int,
        router: Mapping[str, Any],
        num_tasks: int = 1,
        bias: bool = True,
        capacity_factor: float | None = None,
        strategy: str | None = None,
    ) -> None:
        super().__init__(dim, num_experts, router, num_tasks)
        self.head_dim = head_dim
        check_capacity_factor(capacity_factor)
        self.capacity_factor, self.strategy = capacity_factor, strategy
        self.q_proj = ExpertLinear(num_experts, dim, head_dim, bias)
        self.kv = nn.Linear(dim, 2 * head_dim, bias=bias)
        self.out_proj = ExpertLinear(num_experts, head_dim, dim, bias)

    def forward(
        self,
        x: Tensor,
        task_ids: Tensor | None = None,
        *,
        modality_ids: Tensor | None = None,
        valid: Tensor | None = None,
    ) -> tuple[Tensor, RoutingRecord]:
        """``x [B, N, C]`` (or ``[n, C]``: one sequence); ids per sample or per token.

        Tokens with ``valid == False`` neither query nor serve as keys.
        """
        seq = x if x.dim() == 3 else x.unsqueeze(0)
        batch, length, _ = seq.shape
        tokens = rearrange(seq, "b n c -> (b n) c")
        task_ids = rows_per_token(task_ids, batch, length, "task_ids")
        valid = rows_per_token(valid, batch, length, "valid")
        routing, record = self.route(tokens, task_ids, valid)
        record.modality_ids = rows_per_token(modality_ids, batch, length, "modality_ids")
        plan = DispatchPlan.from_routing(
            routing.index, routing.weight, self.num_experts, self.capacity_factor
        )
        key, value = self.kv(seq).chunk(2, dim=-1)
        query = grouped_linear(
            plan.gather(tokens), self.q_proj.weight, self.q_proj.bias, plan, self.strategy
        )
        packed, rows = pack_by_sample(plan, length, batch)
        queries = query.new_zeros(batch * rows, self.head_dim).index_copy(0, packed, query)
        mask = None
        if valid is not None:
            keys = valid.view(batch, 1, length)
            mask = keys | ~keys.any(dim=-1, keepdim=True)
        attended = F.scaled_dot_product_attention(
            queries.view(batch, rows, self.head_dim),
            key.to(query.dtype),
            value.to(query.dtype),
            attn_mask=mask,
        )
        heads = attended.reshape(batch * rows, self.head_dim).index_select(0, packed)
        out = grouped_linear(heads, self.out_proj.weight, self.out_proj.bias, plan, self.strategy)
        y = plan.combine(out)
        return (y.view_as(x) if x.dim() == 3 else y.view(x.shape[0], -1)), record
