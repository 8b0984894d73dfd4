"""The base of every MoE layer: a router built from a config dict, phase switching, records."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
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
    raise ValueError(
        f"{what} has shape {tuple(ids.shape)}; expected [{batch}] per sample or "
        f"[{batch}, {tokens}] per token"
    )


class MoELayer(nn.Module):
    """What every MoE layer shares: ``router``, ``name``, :meth:`set_router`, :meth:`route`,
    and the per-task extraction surgery :meth:`keep_task` / :meth:`keep_experts`.

    ``name`` is the layer's name in its records: the class name until
    :func:`moekit.moe.name_moe_layers` sets it to the module path. Subclasses list the
    submodules that hold their experts' parameters in :attr:`expert_modules` (an
    :class:`~moekit.moe.experts.ExpertLinear` stacking ``E`` experts, or a ``ModuleList``).

    ``num_experts`` counts the experts the layer holds; the router scores
    ``router.num_experts`` of them, more after :meth:`keep_experts` removed some.
    """

    expert_modules: tuple[str, ...] = ()
    expert_map: Tensor | None

    def __init__(self, dim: int, num_experts: int, router: Mapping[str, Any], num_tasks: int):
        super().__init__()
        self.dim, self.num_experts, self.num_tasks = dim, num_experts, num_tasks
        self.router = build_router(router, dim, num_experts, num_tasks)
        self.router_config = dict(router)
        self.name = type(self).__name__
        self.register_buffer("expert_map", None, persistent=False)

    @property
    def expert_ids(self) -> list[int]:
        """The router's ids of the experts the layer holds (all of them until an extraction)."""
        if self.expert_map is None:
            return list(range(self.num_experts))
        return (self.expert_map >= 0).nonzero().flatten().tolist()

    def expert_parameters(self) -> Iterable[nn.Parameter]:
        """The parameters of the layer's experts (not the router's, not shared ones)."""
        for name in self.expert_modules:
            yield from getattr(self, name).parameters()

    def keep_task(self, task: int) -> None:
        """Keep only task ``task``'s gate: the layer serves that task alone (``num_tasks = 1``)."""
        self.router.keep_task(task)
        self.num_tasks = 1

    def keep_experts(self, experts: Iterable[int]) -> None:
        """Remove every expert but ``experts`` (router ids), with physically smaller tensors.

        Per-task extraction (Mod-Squad, Chen et al., CVPR 2023, §3.5). The router is kept
        whole, so ``probs`` is still the score over all ``router.num_experts`` experts (the
        softmax over every logit, unchanged); from then on the layer *selects among the
        experts it kept only* (see :meth:`route`), as a physically smaller router would.
        Tokens whose selection held only kept experts get exactly the output of the unpruned
        layer, so removing the experts a task never selected changes nothing on that data.
        """
        ids = sorted({int(e) for e in experts})
        total = self.router.num_experts
        held = self.expert_ids
        if not ids or ids[0] < 0 or ids[-1] >= total:
            raise ValueError(
                f"{self.name}: experts to keep must be a non-empty subset of 0..{total - 1}, "
                f"got {ids}"
            )
        gone = [e for e in ids if e not in held]
        if gone:
            raise ValueError(f"{self.name}: expert {gone[0]} was already removed")
        device = self.router.gate.weight.device
        index = torch.tensor([held.index(e) for e in ids], dtype=torch.long, device=device)
        for name in self.expert_modules:
            module = getattr(self, name)
            if isinstance(module, nn.ModuleList):
                setattr(self, name, nn.ModuleList(module[i] for i in index.tolist()))
            else:
                module.keep(index)
        expert_map = torch.full((total,), -1, dtype=torch.long, device=device)
        expert_map[ids] = torch.arange(len(ids), device=device)
        self.expert_map = expert_map
        self.num_experts = len(ids)

    def set_router(self, cfg: Mapping[str, Any]) -> None:
        """Switch the selection rule (e.g. dense softmax -> top-p), keeping the gate parameters.

        The new router takes over the very same gate ``Parameter`` objects, so an optimizer
        built before the switch keeps updating them. ``bias`` defaults to the current gate's.
        """
        cfg = {"bias": self.router.gate.bias is not None, **cfg}
        new = build_router(cfg, self.dim, self.router.num_experts, self.num_tasks)
        new.adopt(self.router)
        new.train(self.router.training)
        self.router = new
        self.router_config = dict(cfg)

    def route(
        self, tokens: Tensor, task_ids: Tensor | None, valid: Tensor | None
    ) -> tuple[Routing, RoutingRecord]:
        """Route ``tokens [n, dim]``; tokens with ``valid == False`` select no expert.

        Returns the routing to dispatch with (indices of the experts the layer holds) and the
        record (the router's expert ids).

        After :meth:`keep_experts` the router's own rule (top-k, top-p, dense) is applied to
        the scores with the removed experts' scores set to 0 — for a softmax the same as
        their logits set to ``-inf`` for the selection — so every token selects among the
        kept experts only: top-k takes the ``k`` best kept experts (all of them when fewer
        than ``k`` are kept; slots beyond those stay empty), top-p accumulates the kept
        experts' scores. ``probs`` stays the score over all experts, and the combine weights
        are the kept experts' entries of it (the full-softmax probabilities), divided by their
        sum only when the router renormalizes. This holds for every extraction rule, not only
        with a reduced ``k``: it is what the paper's extracted model computes (a router that can
        only pick the experts left, at the FLOPs of the full model: Mod-Squad ViT-S 5.2
        GFLOPs before and after extraction), whereas dropping the selections of removed experts
        would leave tokens with fewer experts, or none, and the output with less weight.
        A token that selected only kept experts selects the same ones as before.
        """
        routing = self.router(tokens, task_ids)
        if self.expert_map is not None:
            kept = (self.expert_map >= 0).to(routing.probs.device)
            index, weight = self.router.select(routing.probs.masked_fill(~kept, 0.0))
            selected_kept = kept[index.clamp(min=0)] & (index >= 0)
            index = index.masked_fill(~selected_kept, -1)
            weight = weight.masked_fill(~selected_kept, 0.0)
            routing = Routing(routing.probs, routing.logits, index, weight)
        if valid is not None:
            keep = valid.reshape(-1, 1).to(routing.index.device)
            routing.index = routing.index.masked_fill(~keep, -1)
            routing.weight = routing.weight.masked_fill(~keep, 0.0)
        record = RoutingRecord(self.name, routing, task_ids=task_ids, valid=valid)
        if self.expert_map is None:
            return routing, record
        held = self.expert_map[routing.index.clamp(min=0)].masked_fill(routing.index < 0, -1)
        return Routing(routing.probs, routing.logits, held, routing.weight), record
