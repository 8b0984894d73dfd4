"""MoE-MLP: ``E`` expert MLPs with stacked weights and sparse grouped dispatch."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from einops import rearrange
from torch import Tensor

from moekit.moe.activations import get_activation
from moekit.moe.base import MoELayer, rows_per_token
from moekit.moe.dispatch import DispatchPlan, check_capacity_factor, expert_mlp
from moekit.moe.experts import ExpertLinear
from moekit.registry import MOE_LAYERS
from moekit.routing.types import RoutingRecord


@MOE_LAYERS.register("moe_mlp")
class MoEMLP(MoELayer):
    """Mixture of expert MLPs with sparse grouped dispatch (Shazeer et al. 2017; Mod-Squad).

    ``y = sum_{e in S(x)} w_e(x) * (act(x W1_e + b1_e) W2_e + b2_e)``

    where the router chooses the experts ``S(x)`` and weights ``w_e(x)`` per token (with its
    task's gate when ``num_tasks > 1``). To match the FLOPs of a dense MLP of hidden size ``H``
    at top-k, use ``hidden = H / k`` (Mod-Squad). Only selected (token, expert) pairs are
    computed: tokens are sorted by expert and each projection is one grouped matmul.

    Args:
        dim: input and output size ``C``.
        hidden: hidden size of each expert.
        num_experts: ``E``.
        router: router config without ``dim``/``num_experts``/``num_tasks``, e.g.
            ``{"type": "topk", "k": 4}``.
        num_tasks: number of per-task gates.
        activation: ``gelu``, ``gelu_tanh``, ``relu`` or ``silu``.
        bias: expert biases.
        capacity_factor: cap each expert at ``ceil(f * pairs / E)`` pairs (dropless if None).
        strategy: dispatch strategy name (``grouped_mm``, ``loop``); None picks the device's.
    """

    expert_modules = ("fc1", "fc2")

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_experts: int,
        router: Mapping[str, Any],
        num_tasks: int = 1,
        activation: str = "gelu",
        bias: bool = True,
        capacity_factor: float | None = None,
        strategy: str | None = None,
    ) -> None:
        super().__init__(dim, num_experts, router, num_tasks)
        self.hidden = hidden
        self.activation = activation
        self.act = get_activation(activation)
        check_capacity_factor(capacity_factor)
        self.capacity_factor, self.strategy = capacity_factor, strategy
        self.fc1 = ExpertLinear(num_experts, dim, hidden, bias)
        self.fc2 = ExpertLinear(num_experts, hidden, dim, bias)

    def forward(
        self,
        x: Tensor,
        task_ids: Tensor | None = None,
        *,
        modality_ids: Tensor | None = None,
        valid: Tensor | None = None,
    ) -> tuple[Tensor, RoutingRecord]:
        """``x [B, N, C]`` or ``[n, C]``; ids per sample ``[B]`` or per token -> ``(y, record)``."""
        tokens = rearrange(x, "b n c -> (b n) c") if x.dim() == 3 else x
        batch, per_sample = (x.shape[0], x.shape[1]) if x.dim() == 3 else (x.shape[0], 1)
        task_ids = rows_per_token(task_ids, batch, per_sample, "task_ids")
        valid = rows_per_token(valid, batch, per_sample, "valid")
        routing, record = self.route(tokens, task_ids, valid)
        record.modality_ids = rows_per_token(modality_ids, batch, per_sample, "modality_ids")
        plan = DispatchPlan.from_routing(
            routing.index, routing.weight, self.num_experts, self.capacity_factor
        )
        y = expert_mlp(
            tokens,
            self.fc1.weight,
            self.fc1.bias,
            self.fc2.weight,
            self.fc2.bias,
            self.act,
            plan,
            self.strategy,
        )
        return (y.view(*x.shape[:-1], self.dim) if x.dim() == 3 else y), record
