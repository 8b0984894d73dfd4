"""The Python door to moekit: build, train, load, evaluate and extract from a notebook.

Every function takes built objects or config mappings and does one job: none of them writes
files except :class:`~moekit.engine.Trainer` (into its run directory). The command line is built
on the same functions.

Example::

    import moekit

    model = moekit.build_model({"tasks": {...}, "model": {"type": "modsquad_vit", ...}})
    trainer = moekit.Trainer(model=model, tasks=tasks, train_data=dataset, train={"epochs": 2})
    trainer.fit()
    metrics = moekit.evaluate(model, test_dataset, tasks)
    small = moekit.extract_task(model, "depth", usage, threshold=0.0)
    artifact = moekit.load_artifact("exported/")  # written by moekit export
    prediction = artifact.predictor().predict_file("photo.jpg")
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from moekit import config as config_io
from moekit.analysis.extraction import prune_model
from moekit.analysis.usage import ExpertUsage
from moekit.data.collate import collate_samples
from moekit.engine import checkpoint
from moekit.engine.evaluation import evaluate_model
from moekit.engine.experiment import build_model as build_config_model
from moekit.inference.artifact import Artifact
from moekit.inference.artifact import load_artifact as load_artifact_folder
from moekit.registry import import_user_modules
from moekit.types import Batch, Task, parse_tasks


@dataclass
class LoadedRun:
    """A trained model with the config and tasks it was trained with."""

    model: nn.Module
    config: dict[str, Any]
    tasks: dict[str, Task]

    def __iter__(self) -> Any:  # model, config, tasks = load_run(...)
        return iter((self.model, self.config, self.tasks))


def build_model(cfg_or_path: Mapping[str, Any] | str | Path) -> nn.Module:
    """An untrained model from a config (a mapping with ``tasks`` and ``model``, or a YAML
    file)."""
    cfg = (
        config_io.load(config_io.shipped_path(cfg_or_path))
        if isinstance(cfg_or_path, str | Path)
        else dict(cfg_or_path)
    )
    import_user_modules(cfg)
    return build_config_model(cfg)


def load_run(
    run_dir: str | Path,
    checkpoint_name: str = "best",
    device: str | torch.device = "cpu",
    model: nn.Module | None = None,
) -> LoadedRun:
    """The model of a run's checkpoint (``best`` or ``last``), in eval mode, with its config
    and tasks. Pass ``model`` when the run was trained on a model object (its config records
    only the class): its weights are replaced by the checkpoint's."""
    loaded, cfg, tasks = checkpoint.load_model(run_dir, checkpoint_name, device, model)
    return LoadedRun(loaded, cfg, tasks)


def _batches(data: Any, batch_size: int) -> Iterable[Batch]:
    if isinstance(data, Dataset):
        return DataLoader(data, batch_size=batch_size, collate_fn=collate_samples)
    return data  # a DataLoader or any iterable of Batch


def evaluate(
    model: nn.Module,
    data: Dataset | DataLoader | Iterable[Batch],
    tasks: Mapping[str, Task] | Mapping[str, Any],
    *,
    batch_size: int = 8,
    threshold: float = 0.5,
    device: str | torch.device | None = None,
    mixed_precision: str = "no",
) -> dict[str, float]:
    """Losses and metrics of ``model`` on ``data`` (a dataset, a loader or batches) for
    ``tasks`` (``Task`` objects or their config mappings): ``{"<task>/<metric>": value,
    "<task>/loss": ..., "loss": ...}``, the columns of a run's ``metrics.csv``. No run
    directory, no accelerator: the model runs where its parameters are (or on ``device``),
    in bf16 autocast with ``mixed_precision="bf16"``."""
    return evaluate_model(
        model, _batches(data, batch_size), parse_tasks(tasks), threshold, device, mixed_precision
    )


def extract_task(
    model: nn.Module,
    task: str,
    usage: ExpertUsage,
    threshold: float | None = None,
    keep_top: float | None = None,
    reduce_k: bool = False,
) -> nn.Module:
    """The standalone single-task model of ``task`` extracted from ``model`` (left
    unchanged) by expert usage (Mod-Squad, Chen et al., CVPR 2023, §3.5): keep the experts
    whose usage frequency is at least ``threshold``, or the top ``keep_top`` fraction of
    each MoE layer; ``reduce_k`` lowers a top-k router's ``k`` to the experts kept. No
    evaluation, no FLOP count, no file: :func:`moekit.analysis.usage.collect_usage` gives
    ``usage``; ``moekit prune`` composes this with measurement."""
    return prune_model(model, usage, task, threshold, keep_top, reduce_k)[0]


def load_artifact(path: str | Path, device: str | torch.device = "cpu") -> Artifact:
    """An artifact folder written by ``moekit export``: the model (eval mode, on ``device``)
    with its config, tasks, input pipeline and thresholds, without the run directory or its
    dataset. ``artifact.predictor().predict_file(path)`` predicts one file as ``moekit
    predict`` does (docs/predict.md)."""
    return load_artifact_folder(path, device)
