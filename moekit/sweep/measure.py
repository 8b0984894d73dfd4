"""What a study measures on a finished run, cached in ``<run>/sweep.json``.

For the evaluation split and checkpoint of the study (``evaluate:``), a run's cache holds

- ``metrics``: every value ``moekit eval`` reports (``task/metric``, ``loss``, ...) and
  ``directions``: whether each task metric is better higher;
- ``analysis``: one value per analysis column, keyed by what the column measures, so that a
  resumed sweep (or one with a column added) computes only what is missing:

  ===================== ==========================================================
  ``experts_selected``  mean experts selected per token (per sample for module experts)
                        over the split, averaged over the MoE layers whose name matches
                        the column's regex (all layers by default)
  ``mutual_information`` measured ``I(T; E)`` in nats (Mod-Squad eq. 5, from the gate
                        scores over all experts), averaged over the task-routed layers
  ``flops``             inference GFLOPs per image (multiply-adds, fvcore; every task,
                        the experts that ran on the split's first batch)
  ``params``            parameters, millions
  ``active_params``     parameters one token uses on average, millions
  ``pruned_params``     parameters (millions) of the single-task model extracted with
                        ``threshold`` θ (Mod-Squad §3.5; usage counted on
                        ``evaluate.profile_split``) for ``task``, or averaged over tasks
  ===================== ==========================================================

A value that does not apply (no MoE layer, no task-routed layer) is NaN.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moekit.errors import ConfigError
from moekit.fileio import atomic_write_text
from moekit.sweep.study import Column

CACHE_FILE = "sweep.json"
ANALYSIS_KINDS = (
    "experts_selected",
    "mutual_information",
    "flops",
    "params",
    "active_params",
    "pruned_params",
)


def read_cache(run_dir: Path) -> dict[str, Any]:
    path = run_dir / CACHE_FILE
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def cache_entry(run_dir: Path, evaluate: Mapping[str, Any]) -> dict[str, Any]:
    """The cached measurements of ``run_dir`` for the study's split and checkpoint."""
    return read_cache(run_dir).get(f"{evaluate['split']}-{evaluate['checkpoint']}", {})


def _nan_to_none(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else value


def measure_run(
    run_dir: Path, columns: Sequence[Column], evaluate: Mapping[str, Any]
) -> dict[str, Any]:
    """Evaluate ``run_dir`` and compute the analysis values ``columns`` need (cached)."""
    from moekit.engine import evaluate_run
    from moekit.engine.checkpoint import checkpoint_dir, read_config
    from moekit.engine.evaluation import metric_directions
    from moekit.types import tasks_from_config

    split, which = evaluate["split"], evaluate["checkpoint"]
    cache = read_cache(run_dir)
    entry = cache.setdefault(f"{split}-{which}", {})
    if "metrics" not in entry:
        values = evaluate_run(run_dir, split, which)
        prefix = f"{split}/"
        entry["metrics"] = {
            k.removeprefix(prefix): _nan_to_none(float(v)) for k, v in values.items()
        }
        tasks = tasks_from_config(read_config(checkpoint_dir(run_dir, which)))
        entry["directions"] = metric_directions(tasks)
    analysis = entry.setdefault("analysis", {})
    missing = [c for c in columns if c.kind in ANALYSIS_KINDS and c.key() not in analysis]
    if missing:
        analysis.update(
            {k: _nan_to_none(v) for k, v in analyse(run_dir, missing, evaluate).items()}
        )
    atomic_write_text(run_dir / CACHE_FILE, json.dumps(cache, indent=2) + "\n")
    return entry


def _layer_mean(values: Mapping[str, float | None], pattern: str | None) -> float:
    chosen = [
        v
        for name, v in values.items()
        if v is not None and (not pattern or re.search(pattern, name))
    ]
    return sum(chosen) / len(chosen) if chosen else math.nan


def analyse(
    run_dir: Path, columns: Sequence[Column], evaluate: Mapping[str, Any]
) -> dict[str, float]:
    """Compute the analysis columns on the run's checkpoint (model loaded once)."""
    from moekit.analysis.flops import (
        active_parameters,
        count_flops,
        count_parameters,
        routing_records,
    )
    from moekit.analysis.runs import TrainedRun, input_batch_size
    from moekit.analysis.usage import collect_usage

    run = TrainedRun.load(run_dir, evaluate["checkpoint"])
    tasks = list(run.tasks)
    kinds = {c.kind for c in columns}
    usage = {}
    splits = {evaluate["split"]} if kinds & {"experts_selected", "mutual_information"} else set()
    if "pruned_params" in kinds:
        splits.add(evaluate["profile_split"])
    for split in sorted(splits):
        usage[split] = collect_usage(run.model, run.loader(split), tasks)
    inputs = None
    if kinds & {"flops", "active_params"}:
        inputs = next(iter(run.loader(evaluate["split"])))
    values: dict[str, float] = {}
    for column in columns:
        arg = column.arg
        if column.kind == "experts_selected":
            layers = usage[evaluate["split"]].layers
            value = _layer_mean({n: u.mean_selected() for n, u in layers.items()}, arg)
        elif column.kind == "mutual_information":
            layers = usage[evaluate["split"]].layers
            value = _layer_mean({n: u.mutual_information() for n, u in layers.items()}, arg)
        elif column.kind == "flops":
            value = count_flops(run.model, inputs).total / input_batch_size(inputs) / 1e9
        elif column.kind == "params":
            value = count_parameters(run.model) / 1e6
        elif column.kind == "active_params":
            value = active_parameters(run.model, routing_records(run.model, inputs)) / 1e6
        else:
            value = _pruned_params(run, usage[evaluate["profile_split"]], arg, tasks)
        values[column.key()] = float(value)
    return values


def _pruned_params(run: Any, usage: Any, arg: Mapping[str, Any], tasks: list[str]) -> float:
    from moekit.analysis.extraction import prune_model
    from moekit.analysis.flops import count_parameters

    chosen = [arg["task"]] if arg.get("task") else tasks
    for task in chosen:
        if task not in tasks:
            raise ConfigError(f"pruned_params.task: '{task}' is not a task; tasks: {tasks}")
    sizes = [
        count_parameters(prune_model(run.model, usage, task, threshold=arg["threshold"])[0])
        for task in chosen
    ]
    return sum(sizes) / len(sizes) / 1e6
