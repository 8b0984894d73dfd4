"""A mixture over arbitrary expert modules, routed per sample (the IDRiD paper's MoE heads)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from moekit.errors import ConfigError
from moekit.moe.base import MoELayer
from moekit.moe.dispatch import DispatchPlan
from moekit.registry import EXPERTS, MOE_LAYERS
from moekit.routing.types import RoutingRecord


def build_experts(experts: Sequence[nn.Module] | Mapping[str, Any]) -> nn.ModuleList:
    """A list of modules as given, or ``{type, num_experts, **kwargs}`` built from ``EXPERTS``
    ``num_experts`` times."""
    if isinstance(experts, Mapping):
        cfg = dict(experts)
        count = cfg.pop("num_experts", None)
        if not isinstance(count, int) or count < 1:
            raise ConfigError(
                f"experts: a config needs 'num_experts' (a positive int), got {count!r}"
            )
        return nn.ModuleList(EXPERTS.build(cfg) for _ in range(count))
    modules = list(experts)
    if not modules or not all(isinstance(m, nn.Module) for m in modules):
        raise ConfigError("experts: expected a non-empty list of modules or an EXPERTS config")
    return nn.ModuleList(modules)


def pool(features: Tensor) -> Tensor:
    """Global average pooling of channels-first features ``[B, C, ...]`` to ``[B, C]``."""
    return features.flatten(2).mean(dim=-1) if features.dim() > 2 else features


@MOE_LAYERS.register("moe_modules")
class MoEModules(MoELayer):
    """A mixture of arbitrary expert modules, routed per sample on pooled features.

    ``y_b = sum_{e in S(g_b)} w_e(g_b) * expert_e(x_b)``, ``g_b = AvgPool(gate_input_b)``

    as in the IDRiD paper (its per-task gate is ``sigmoid(Linear(AvgPool(features)))``: use
    ``score: sigmoid``). Samples are grouped by expert the same way tokens are: each expert runs
    once, on the samples that selected it, and an unselected expert does not run at all.
    Expert outputs may have any shape (class logits ``[b, K]``, segmentation logits
    ``[b, 1, H, W]``) as long as all experts agree.

    Args:
        experts: a list of modules, or ``{type: <EXPERTS name>, num_experts: E, **kwargs}``.
        router: router config without ``dim``/``num_experts``/``num_tasks``.
        num_tasks: number of per-task gates.
        dim: channels of the gate input (the pooled features the router sees).
    """

    expert_modules = ("experts",)

    def __init__(
        self,
        experts: Sequence[nn.Module] | Mapping[str, Any],
        router: Mapping[str, Any],
        num_tasks: int = 1,
        dim: int | None = None,
    ) -> None:
        if dim is None:
            raise ConfigError("MoEModules needs 'dim': the channels of the gate input")
        modules = build_experts(experts)
        super().__init__(dim, len(modules), router, num_tasks)
        self.experts = modules

    def forward(
        self,
        x: Tensor | Sequence[Tensor],
        task_ids: Tensor | None = None,
        *,
        gate_input: Tensor | None = None,
        valid: Tensor | None = None,
    ) -> tuple[Tensor, RoutingRecord]:
        """``x [B, C, H, W]`` (or a tuple of per-sample tensors passed to every expert as
        positional arguments); the router sees ``pool(gate_input)`` (default: the first
        input). ``task_ids`` and ``valid`` are per sample ``[B]``."""
        inputs = (x,) if isinstance(x, Tensor) else tuple(x)
        batch = inputs[0].shape[0]
        features = pool(inputs[0] if gate_input is None else gate_input)
        routing, record = self.route(features, task_ids, valid)
        plan = DispatchPlan.from_routing(routing.index, routing.weight, self.num_experts)
        out: Tensor | None = None
        for e, rows in plan.groups():
            token = plan.token[rows]
            everyone = rows.stop - rows.start == batch
            args = inputs if everyone else tuple(t.index_select(0, token) for t in inputs)
            result = self.experts[e](*args)
            weight = plan.weight[rows].to(result.dtype).view(-1, *([1] * (result.dim() - 1)))
            if out is None:
                out = result.new_zeros(batch, *result.shape[1:])
            out = out.index_add(0, token, result * weight)
        if out is None:
            # no sample selected a held expert (all invalid, or only experts removed by
            # keep_experts): zeros of the output shape, taken from an empty batch
            empty = self.experts[0](*(t[:0] for t in inputs))
            out = empty.new_zeros(batch, *empty.shape[1:])
        return out, record
