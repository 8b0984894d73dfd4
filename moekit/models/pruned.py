"""A single-task model extracted from a multi-task MoE model (``type: pruned``).

Per-task extraction (Chen et al., "Mod-Squad", CVPR 2023, §3.5) turns a trained multi-task
model into a standalone model for one task with fewer experts. Its config records how to
rebuild that architecture from the source model's config::

    model:
      type: pruned
      model: {type: modsquad_vit, ...}        # the source model's config, unchanged
      source_tasks: {shape: {...}, depth: {...}}  # the source model's tasks, in order
      task: depth                             # the task kept
      layers:                                 # per MoE layer: kept experts (router ids), router
        blocks.1.mlp: {experts: [0, 3, 5], router: {type: topk, k: 2}}

Building it builds the source architecture, keeps ``task`` (``model.single_task``: its head,
its gates, its task embedding) and applies :func:`apply_layer_specs`; the weights are loaded
afterwards. The router of every layer is recorded (the routing phase the source checkpoint
was in, possibly with a reduced ``k``), so an extracted run needs no ``routing_schedule``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from moekit.errors import ConfigError
from moekit.moe import moe_layers
from moekit.registry import MODELS
from moekit.types import Task, tasks_from_config


def layer_spec(experts: list[int], router: Mapping[str, Any]) -> dict[str, Any]:
    """The config entry of one extracted MoE layer."""
    return {"experts": [int(e) for e in experts], "router": dict(router)}


def apply_layer_specs(model: nn.Module, layers: Mapping[str, Mapping[str, Any]]) -> None:
    """Give each named MoE layer its router and keep only its listed experts."""
    found = dict(moe_layers(model))
    for name, spec in layers.items():
        if name not in found:
            raise ConfigError(
                f"model.layers: no MoE layer '{name}' in {type(model).__name__}; "
                f"valid: {', '.join(found)}"
            )
        layer = found[name]
        if "router" in spec and dict(spec["router"]) != layer.router_config:
            layer.set_router(spec["router"])
        layer.keep_experts(spec["experts"])


@MODELS.register("pruned")
def build_pruned(
    tasks: Mapping[str, Task],
    model: Mapping[str, Any],
    source_tasks: Mapping[str, Any],
    task: str,
    layers: Mapping[str, Mapping[str, Any]] | None = None,
) -> nn.Module:
    """One task extracted from a multi-task MoE model (Mod-Squad §3.5): the source
    architecture with that task's head and gates only and fewer experts per MoE layer."""
    if list(tasks) != [task]:
        raise ConfigError(
            f"model.task: a pruned model serves '{task}' only; the config's tasks are "
            f"{', '.join(tasks)}"
        )
    net = MODELS.build(model, tasks=tasks_from_config({"tasks": source_tasks}))
    if not hasattr(net, "single_task"):
        raise ConfigError(f"model.model: {type(net).__name__} has no single_task()")
    net.single_task(task)
    apply_layer_specs(net, layers or {})
    return net
