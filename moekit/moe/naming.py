"""Find, name and re-route the MoE layers of a model."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import nn

from moekit.moe.base import MoELayer


def moe_layers(model: nn.Module) -> list[tuple[str, MoELayer]]:
    """``(module path, layer)`` for every MoE layer of ``model``, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]


def name_moe_layers(model: nn.Module) -> None:
    """Set each MoE layer's ``name`` (the ``layer`` of its records) to its module path.

    Models call this at the end of ``__init__``, so records read e.g. ``blocks.1.mlp``.
    """
    for name, layer in moe_layers(model):
        layer.name = name or type(layer).__name__


def keep_task_routers(model: nn.Module, task: int) -> None:
    """Keep only task ``task``'s gate in every task-conditioned MoE layer of ``model``
    (per-task extraction; layers with a single gate serve one task already)."""
    for _, layer in moe_layers(model):
        if layer.num_tasks > 1:
            layer.keep_task(task)


def set_routing(model: nn.Module, router_cfg: Mapping[str, Any], layers: str | None = None) -> int:
    """Give MoE layers a new selection rule (a phase switch, e.g. dense softmax -> top-p).

    ``layers`` is a regular expression searched in each layer's module path (``None``: all).
    Each layer keeps its gate parameter objects (see :meth:`MoELayer.set_router`), so the
    optimizer stays valid. Returns the number of layers changed.
    """
    pattern = re.compile(layers) if layers is not None else None
    changed = 0
    for name, layer in moe_layers(model):
        if pattern is None or pattern.search(name):
            layer.set_router(router_cfg)
            changed += 1
    return changed
