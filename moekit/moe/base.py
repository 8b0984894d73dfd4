"""The base of every MoE layer: a router built from a config dict, phase switching, records."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from moekit.errors import ConfigError
from moekit.registry import ROUTERS
from moekit.routing.base import Router
from moekit.routing.types import Routing, RoutingRecord

FILLED_ROUTER_KEYS = ("dim", "num_experts", "num_tasks")


def build_router(cfg: Mapping[str, Any], dim: int, num_experts: int, num_tasks: int) -> Router:
    """Build a router from a layer's ``router:`` config, filling in the layer's shape."""
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"router: expected a mapping with a 'type' key, got {cfg!r}")
    given = [key for key in FILLED_ROUTER_KEYS if key in cfg]
    if given:
        raise ConfigError(
            f"router: '{given[0]}' is set by the MoE layer; remove it from the router config"
        )
    return ROUTERS.build(cfg, dim=dim, num_experts=num_experts, num_tasks=num_tasks)


def rows_per_token(ids: Tensor | None, batch: int, tokens: int, what: str) -> Tensor | None:
    """Expand per-sample ids ``[B]`` to per-token ids ``[B * N]``; accept ``[B, N]`` or
    ``[B * N]`` as they are."""
    if ids is None:
        return None
    if ids.dim() == 1 and ids.shape[0] == batch and tokens != 1:
        return ids.repeat_interleave(tokens)
    if ids.numel() == batch * tokens:
        return ids.reshape(-1)
    raise ConfigError(
        f"{what} has shape {tuple(ids.shape)}; expected [{batch}] per sample or "
        f"[{batch}, {tokens}] per token"
    )


class MoELayer(nn.Module):
    """What every MoE layer shares: ``router``, ``name``, :meth:`set_router`, :meth:`route`.

    ``name`` is the layer's name in its records: the class name until
    :func:`moekit.moe.name_moe_layers` sets it to the module path.
    """

    def __init__(self, dim: int, num_experts: int, router: Mapping[str, Any], num_tasks: int):
        super().__init__()
        self.dim, self.num_experts, self.num_tasks = dim, num_experts, num_tasks
        self.router = build_router(router, dim, num_experts, num_tasks)
        self.router_config = dict(router)
        self.name = type(self).__name__

    def set_router(self, cfg: Mapping[str, Any]) -> None:
        """Switch the selection rule (e.g. dense softmax -> top-p), keeping the gate parameters.

        The new router takes over the very same gate ``Parameter`` objects, so an optimizer
        built before the switch keeps updating them. ``bias`` defaults to the current gate's.
        """
        cfg = {"bias": self.router.gate.bias is not None, **cfg}
        new = build_router(cfg, self.dim, self.num_experts, self.num_tasks)
        new.adopt(self.router)
        new.train(self.router.training)
        self.router = new
        self.router_config = dict(cfg)

    def route(
        self, tokens: Tensor, task_ids: Tensor | None, valid: Tensor | None
    ) -> tuple[Routing, RoutingRecord]:
        """Route ``tokens [n, dim]``; tokens with ``valid == False`` select no expert."""
        routing = self.router(tokens, task_ids)
        if valid is not None:
            keep = valid.reshape(-1, 1).to(routing.index.device)
            routing.index = routing.index.masked_fill(~keep, -1)
            routing.weight = routing.weight.masked_fill(~keep, 0.0)
        record = RoutingRecord(self.name, routing, task_ids=task_ids, valid=valid)
        return routing, record
