"""Per-task expert extraction: which experts a task keeps, and the surgery that removes the rest.

Mod-Squad (Chen et al., CVPR 2023, §3.5, §4.3): count how often each expert serves task ``T``
over a dataset (:class:`~moekit.analysis.usage.ExpertUsage`), then in every MoE layer

- **threshold** ("remove all experts that have a usage frequency lower than θ"): the usage
  frequency is the paper's ``P(E_e | T)`` of §3.3 — "for 100 images in task T, if the routing
  network assigns 30 of them to expert E, then P(E | T) = 0.3" — the fraction of ``T``'s tokens
  (or samples) that selected ``e``::

      freq[T, e] = count[T, e] / tokens[T]        keep e  iff  count[T, e] > 0 and freq >= θ

  It lies in [0, 1] per expert and sums to the mean number of experts selected (``k`` for
  top-k), not to 1, so the paper's sweep θ = 0%, 0.1%, 5%, 20%, 50%, 90% keeps the experts
  used by at least that share of the task's tokens: θ = 0.9 the experts nearly every token
  uses, θ = 0.5 those at least half use. ``θ = 0`` removes exactly the experts ``T`` never
  selected, so the extracted model reproduces the full model's outputs for ``T`` on the
  profiling data;
- **keep-top**: keep the ``ceil(H · E)`` most used experts of the layer (``H`` a fraction).

A layer always keeps its most used expert. With ``reduce_k`` a top-k router whose ``k`` exceeds
the experts kept gets ``k = experts kept`` (the paper does; its public code keeps ``k``).

The extracted model serves ``T`` alone: one gate per router (row ``T``), ``T``'s task embedding
and head, physically smaller expert tensors (:meth:`moekit.moe.MoELayer.keep_experts`). Each
router keeps all its logits, so the scores over all experts are those of the full model, and
every token selects among the kept experts only (:meth:`moekit.moe.MoELayer.route`, in every
rule): top-k still runs ``min(k, kept)`` experts per token, with the kept experts'
full-softmax probabilities as weights.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from moekit.analysis.usage import ExpertUsage
from moekit.errors import ConfigError, DataError
from moekit.models.pruned import apply_layer_specs, layer_spec
from moekit.models.single_task import task_position
from moekit.moe import moe_layers


def check_rule(threshold: float | None, keep_top: float | None) -> None:
    """Exactly one rule: ``0 <= threshold <= 1`` or ``0 < keep_top <= 1``."""
    if (threshold is None) == (keep_top is None):
        raise ConfigError("prune: give exactly one of threshold (θ) and keep_top (H)")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ConfigError(
            f"prune: threshold is a usage frequency in [0, 1] (0.01 = 1%), got {threshold}"
        )
    if keep_top is not None and not 0.0 < keep_top <= 1.0:
        raise ConfigError(f"prune: keep_top is a fraction in (0, 1] (0.4 = 40%), got {keep_top}")


def experts_to_keep(
    count: Tensor,
    candidates: list[int],
    threshold: float | None = None,
    keep_top: float | None = None,
    tokens: float | None = None,
    weight: Tensor | None = None,
) -> list[int]:
    """The experts a layer keeps for one task, from its selection counts ``count [E]``.

    ``candidates`` are the experts the layer still holds; ``tokens`` is the number of the
    task's tokens (or samples) the counts come from (needed by the threshold rule).
    Threshold: ``count > 0`` and ``count / tokens >= threshold`` (the usage frequency of
    the module docstring); keep-top: the ``ceil(keep_top · len(candidates))`` most used (ties
    go to the larger summed routing ``weight [E]`` when given, then to the lower id: a Soft
    MoE layer uses every expert for every token, so its experts differ only in weight). The
    most used candidate is always kept.
    """
    check_rule(threshold, keep_top)
    counts = {e: float(count[e]) for e in candidates}
    weights = {e: 0.0 if weight is None else float(weight[e]) for e in candidates}
    ranked = sorted(candidates, key=lambda e: (-counts[e], -weights[e], e))
    if keep_top is not None:
        kept = ranked[: max(1, math.ceil(round(keep_top * len(candidates), 9)))]
    else:
        if tokens is None:
            raise ConfigError("prune: the threshold rule needs the number of tokens counted")
        total = float(tokens) or 1.0
        kept = [e for e in candidates if counts[e] > 0 and counts[e] / total >= threshold]
    return sorted(set(kept) | {ranked[0]})


def usage_row(usage: ExpertUsage, layer: str, task: str) -> tuple[Tensor, float]:
    """``(count [E], tokens)`` of ``task`` in ``layer`` (the only row of a layer that knows no
    tasks)."""
    stats = usage.layers.get(layer)
    if stats is None:
        raise DataError(f"expert usage has no layer '{layer}' (did the profiling data reach it?)")
    row = task_row(usage, layer, task)
    return stats.count[row], float(stats.tokens[row])


def task_row(usage: ExpertUsage, layer: str, task: str) -> int:
    """The row of ``task`` in ``layer``'s statistics (0 for a layer that knows no tasks)."""
    return 0 if usage.layers[layer].count.shape[0] == 1 else task_position(usage.tasks, task)


def reduced_router(layer: nn.Module, kept: int) -> dict[str, Any]:
    """The layer's router config with ``k`` lowered to ``kept`` where it exceeds it."""
    router = dict(layer.router_config)
    k = getattr(layer.router, "k", None)
    if k is not None and k > kept:
        router["k"] = kept
    return router


def prune_model(
    model: nn.Module,
    usage: ExpertUsage,
    task: str,
    threshold: float | None = None,
    keep_top: float | None = None,
    reduce_k: bool = False,
) -> tuple[nn.Module, dict[str, dict[str, Any]]]:
    """Extract ``task`` from ``model`` (left unchanged): ``(extracted model, layer specs)``.

    The specs (``{layer: {experts, router}}``, router expert ids) rebuild the architecture
    with :func:`moekit.models.pruned.apply_layer_specs` (see :func:`pruned_config`).
    """
    check_rule(threshold, keep_top)
    if not hasattr(model, "single_task"):
        raise ConfigError(f"{type(model).__name__} has no single_task(): cannot extract a task")
    pruned = copy.deepcopy(model)
    pruned.single_task(task)
    specs = {}
    for name, layer in moe_layers(pruned):
        count, tokens = usage_row(usage, name, task)
        weight = usage.layers[name].weight[task_row(usage, name, task)]
        kept = experts_to_keep(count, layer.expert_ids, threshold, keep_top, tokens, weight)
        router = reduced_router(layer, len(kept)) if reduce_k else dict(layer.router_config)
        specs[name] = layer_spec(kept, router)
    apply_layer_specs(pruned, specs)
    return pruned.eval(), specs


def pruned_config(
    cfg: Mapping[str, Any], task: str, specs: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """The resolved config of the model extracted for ``task`` (``model.type: pruned``).

    Only ``task`` remains in ``tasks``; routing phases are baked into the layer specs;
    routing losses, the task weighting and the multi-task Δ are reset (one task, one gate);
    a monitor of another task becomes ``<split>/<task>/loss``.
    """
    new = copy.deepcopy(dict(cfg))
    source = new["model"]
    if source.get("type") == "pruned":
        source_model, source_tasks = source["model"], source["source_tasks"]
    else:
        source_model, source_tasks = source, new["tasks"]
        new["name"] = f"{cfg.get('name', 'run')}-{task}"
    new["tasks"] = {task: copy.deepcopy(source_tasks[task])}
    new["model"] = {
        "type": "pruned",
        "model": source_model,
        "source_tasks": source_tasks,
        "task": task,
        "layers": {name: dict(spec) for name, spec in specs.items()},
    }
    new["routing_schedule"] = []
    new["aux_losses"] = []
    new["weighting"] = {"type": "equal"}
    evaluation = {k: v for k, v in dict(new.get("eval") or {}).items() if k != "mtl_delta"}
    parts = str(evaluation.get("monitor") or "").split("/")
    if len(parts) > 2 and parts[1] != task:
        evaluation = {"monitor": f"{parts[0]}/{task}/loss", "mode": "min"}
    new["eval"] = evaluation
    return new
