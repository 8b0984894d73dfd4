"""``evaluate_run``: the metrics of a saved run's checkpoint on one split (``moekit eval``),
and the baselines of the multi-task delta (``moekit eval --baselines``)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from moekit import config as config_io
from moekit.engine import checkpoint
from moekit.engine.data import build_loader
from moekit.engine.evaluation import evaluate_loop
from moekit.engine.experiment import build_experiment
from moekit.engine.launch import make_accelerator
from moekit.engine.rundir import json_safe
from moekit.errors import CheckpointError, ConfigError
from moekit.fileio import atomic_write_text
from moekit.registry import METRICS
from moekit.sections import settings
from moekit.types import Task


def evaluate_run(
    run_dir: str | Path,
    split: str = "test",
    which: str = "best",
    mtl_delta: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """Evaluate ``checkpoints/<which>`` of ``run_dir`` on ``split``.

    ``mtl_delta`` (``{baselines, variant}``) replaces the run's ``eval.mtl_delta``.
    With ``eval.thresholds: tune`` the checkpoint's per-class thresholds (tuned on ``val``) are
    applied unchanged. Writes ``<run_dir>/eval/<split>-<which>.json`` and returns
    ``{"<split>/<column>": value}``.
    Runs on any number of processes (metrics are gathered across them).
    """
    run_dir = Path(run_dir)
    path = checkpoint.checkpoint_dir(run_dir, which)
    cfg = checkpoint.read_config(path)
    train = settings(cfg, "train")
    accelerator = make_accelerator({**train, "log_with": None, "grad_accum": 1})
    exp = build_experiment(cfg, accelerator.num_processes, splits=[split])
    checkpoint.load_weights(exp.model, path / checkpoint.MODEL_FILE)
    checkpoint.restore_routing(exp.model, cfg, path)
    loader = build_loader(exp.datasets[split], exp.data, train=False, seed=int(cfg.get("seed", 0)))
    objective, loader = accelerator.prepare(exp.objective, loader)
    bare: Any = accelerator.unwrap_model(objective)
    delta = (
        exp.mtl_delta if mtl_delta is None else METRICS.build({"type": "mtl_delta", **mtl_delta})
    )
    values = evaluate_loop(
        bare.model,
        bare,
        loader,
        exp.tasks,
        delta,
        threshold=settings(cfg, "eval")["threshold"],
        autocast=accelerator.autocast,
        gather=accelerator.gather_for_metrics,
        thresholds=tuned_thresholds(cfg, path),
    )
    result = {f"{split}/{k}": v for k, v in values.items()}
    if accelerator.is_main_process:
        out = run_dir / "eval" / f"{split}-{which}.json"
        atomic_write_text(
            out,
            json.dumps({"checkpoint": str(path), "metrics": json_safe(result)}, indent=2) + "\n",
        )
    return result


def tuned_thresholds(cfg: Mapping[str, Any], path: Path) -> dict[str, list[float]] | None:
    """The per-class thresholds tuned on validation and kept in the checkpoint at ``path``
    (``eval.thresholds: tune``; None otherwise), to apply unchanged to any split."""
    if settings(cfg, "eval")["thresholds"] != "tune":
        return None
    found = checkpoint.read_state(path).get("thresholds")
    if not found:
        raise CheckpointError(
            f"{path}: eval.thresholds is tune, but the checkpoint holds no tuned thresholds "
            "(saved before its first validation?)"
        )
    return {task: [float(t) for t in values] for task, values in found.items()}


def primary_metrics(tasks: Mapping[str, Task]) -> list[str]:
    """``task/metric`` of each task's first metric: its primary metric, which the multi-task
    delta compares (Mod-Squad reports one metric per task)."""
    return [f"{name}/{task.metrics[0].name}" for name, task in tasks.items() if task.metrics]


def read_baselines(
    sources: Iterable[str | Path], keys: Iterable[str], split: str = "test", which: str = "best"
) -> dict[str, float]:
    """Baseline values of ``keys`` (``task/metric``) for the multi-task delta.

    Each source is a run directory (e.g. one single-task run per task, evaluated now on
    ``split``), an ``eval/<split>-<checkpoint>.json`` written by ``moekit eval``, or a YAML/JSON
    mapping ``{task/metric: value}``. A key found in two sources is an error.
    """
    keys = list(keys)
    values: dict[str, float] = {}
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found = _strip_split(evaluate_run(path, split, which), split, path)
        else:
            data = config_io.read_yaml(path)
            metrics = data.get("metrics")
            found = _strip_split(metrics, split, path) if isinstance(metrics, Mapping) else data
        for key in keys:
            value = found.get(key)
            if value is None or math.isnan(float(value)):
                continue
            if key in values:
                raise ConfigError(f"baselines: '{key}' is given by two sources (second: {path})")
            values[key] = float(value)
    if not values:
        raise ConfigError(f"baselines: no source holds any of {', '.join(keys)}")
    return values


def _strip_split(values: Mapping[str, Any], split: str, source: Path) -> dict[str, Any]:
    prefix = f"{split}/"
    found = {k[len(prefix) :]: v for k, v in values.items() if k.startswith(prefix)}
    if not found:
        raise ConfigError(f"{source}: holds no '{split}' values")
    return found
