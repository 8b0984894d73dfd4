"""``evaluate_run``: the metrics of a saved run's checkpoint on one split (``moekit eval``),
optionally with modalities removed (``--drop-modality``), and the baselines of the multi-task
delta (``moekit eval --baselines``)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from moekit import config as config_io
from moekit.engine import checkpoint
from moekit.engine.data import build_loader
from moekit.engine.evaluation import evaluate_loop
from moekit.engine.experiment import build_experiment
from moekit.engine.launch import make_accelerator
from moekit.engine.rundir import json_safe
from moekit.errors import CheckpointError, ConfigError, did_you_mean
from moekit.fileio import atomic_write_text
from moekit.registry import METRICS
from moekit.sections import settings
from moekit.types import Batch, Task


def without_modalities(batch: Batch, names: Sequence[str]) -> Batch:
    """``batch`` with the modalities ``names`` absent from every sample: their ``present``
    column False and their tensor a zero filler, as for a sample whose file is missing
    (targets are kept: a task that needs the modality is scored on what the model predicts
    without it)."""
    if not names:
        return batch
    inputs = {m: torch.zeros_like(x) if m in names else x for m, x in dict(batch.inputs).items()}
    present = batch.present.clone()
    for name in names:
        present[:, batch.modalities.index(name)] = False
    return Batch(inputs, batch.targets, batch.has_target, batch.meta, present)


def check_dropped(dataset: Any, model: Any, names: Sequence[str]) -> None:
    """``names`` must be modalities the dataset loads, and leave the model one it reads."""
    loaded = tuple(getattr(dataset, "modalities", ()))
    for name in names:
        if name not in loaded:
            raise ConfigError(
                f"--drop-modality: '{name}' is not a modality of the data "
                f"({', '.join(loaded) or 'a single image'}){did_you_mean(str(name), loaded)}"
            )
    read = list(getattr(model, "modality_names", loaded))
    if all(m in names for m in read):
        raise ConfigError(
            f"--drop-modality: the model reads only {', '.join(read)}; without "
            f"{', '.join(names)} it has no input left"
        )
    if not getattr(dataset, "dict_inputs", True):
        raise ConfigError(
            "--drop-modality: the data serves one modality as a plain tensor; set "
            "dict_inputs: true on the dataset to drop modalities"
        )


def eval_file_name(split: str, which: str, dropped: Sequence[str] = ()) -> str:
    """``<split>-<which>[-without-<m>+<m>].json``: where :func:`evaluate_run` writes."""
    suffix = f"-without-{'+'.join(dropped)}" if dropped else ""
    return f"{split}-{which}{suffix}.json"


def evaluate_run(
    run_dir: str | Path,
    split: str = "test",
    which: str = "best",
    mtl_delta: Mapping[str, Any] | None = None,
    drop_modalities: Sequence[str] = (),
) -> dict[str, float]:
    """Evaluate ``checkpoints/<which>`` of ``run_dir`` on ``split``.

    ``mtl_delta`` (``{baselines, variant}``) replaces the run's ``eval.mtl_delta``.
    With ``eval.thresholds: tune`` the checkpoint's per-class thresholds (tuned on ``val``) are
    applied unchanged. ``drop_modalities`` removes those modalities from every sample of the
    split (:func:`without_modalities`; modality competition). Writes
    ``<run_dir>/eval/<split>-<which>[-without-<m>].json`` and returns
    ``{"<split>/<column>": value}``.
    Runs on any number of processes (metrics are gathered across them).
    """
    dropped = list(dict.fromkeys(drop_modalities))
    run_dir = Path(run_dir)
    path = checkpoint.checkpoint_dir(run_dir, which)
    cfg = checkpoint.read_config(path)
    train = settings(cfg, "train")
    accelerator = make_accelerator({**train, "log_with": None, "grad_accum": 1})
    exp = build_experiment(cfg, accelerator.num_processes, splits=[split])
    checkpoint.load_weights(exp.model, path / checkpoint.MODEL_FILE)
    checkpoint.restore_routing(exp.model, cfg, path)
    if dropped:
        check_dropped(exp.datasets[split], exp.model, dropped)
    loader = build_loader(exp.datasets[split], exp.data, train=False, seed=int(cfg.get("seed", 0)))
    objective, loader = accelerator.prepare(exp.objective, loader)
    bare: Any = accelerator.unwrap_model(objective)
    delta = (
        exp.mtl_delta if mtl_delta is None else METRICS.build({"type": "mtl_delta", **mtl_delta})
    )
    values = evaluate_loop(
        bare.model,
        bare,
        (without_modalities(batch, dropped) for batch in loader),
        exp.tasks,
        delta,
        threshold=settings(cfg, "eval")["threshold"],
        autocast=accelerator.autocast,
        gather=accelerator.gather_for_metrics,
        thresholds=tuned_thresholds(cfg, path),
    )
    result = {f"{split}/{k}": v for k, v in values.items()}
    if accelerator.is_main_process:
        out = run_dir / "eval" / eval_file_name(split, which, dropped)
        record = {"checkpoint": str(path), "dropped_modalities": dropped}
        atomic_write_text(
            out, json.dumps({**record, "metrics": json_safe(result)}, indent=2) + "\n"
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
