"""One input through a trained model: probabilities, decisions, dense maps, selected experts.

Each input runs alone (a batch of one), so its predictions do not depend on the other inputs.
Per task kind (:func:`moekit.analysis.tta.task_probabilities` turns outputs into
probabilities):

- ``multiclass``: the class probabilities (softmax); the decision is the most probable class;
- ``multilabel``: a probability per class (sigmoid); class ``c`` is positive when
  ``p_c > t_c`` (:func:`moekit.metrics.base.above_threshold`, the metrics' rule);
- ``segmentation``: a binary task's probability map (sigmoid), the mask ``p > t``; a
  multi-class map's per-class probabilities (softmax), the label map their arg-max;
- ``regression``: the values (a dense regression task: a map of them).

Dense outputs are brought to the input size of the modality they are drawn on (bilinear, if
the model predicts at another resolution) and mapped back onto the photograph's own pixels
through its preprocessing geometry (:func:`moekit.data.preprocess.to_original`, linear
interpolation of the probabilities) *before* the decision, so a mask has the file's
resolution; outside the field of view it is 0.

The thresholds ``t`` are the run's: :func:`decision_thresholds`. With ``tta="flip"`` the
probabilities are averaged with those of the mirror image (:mod:`moekit.analysis.tta`).

Experts: for every MoE layer, the experts the input's tokens selected, per task: a layer
that is one task's module (its path names the task, as ``heads.rg``) counts for that task, a
layer that routes each task with its own gate (rows tagged with the run's task ids) for each
task, any other layer under ``shared`` (:func:`selected_experts`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.analysis.tta import TTA_MODES, predict_probabilities, task_probabilities
from moekit.data.preprocess import Geometry, PreprocessStep, to_original
from moekit.errors import ConfigError, did_you_mean
from moekit.inference.inputs import InputItem, InputPipeline, LoadedInput, safe_id
from moekit.metrics.base import above_threshold
from moekit.routing.types import RoutingRecord
from moekit.sections import settings
from moekit.types import Task, run_model

SHARED = "shared"
"""The key of the layers that route every task alike (no per-task gate)."""


def thresholded(task: Task) -> bool:
    """Whether a task's decision compares probabilities with thresholds (multi-label tasks,
    binary segmentation) rather than taking the arg-max or the value."""
    return task.kind == "multilabel" or (task.kind == "segmentation" and task.num_classes == 1)


def decision_thresholds(
    cfg: Mapping[str, Any], tasks: Mapping[str, Task], checkpoint: Path | None = None
) -> dict[str, list[float]]:
    """The run's decision thresholds: ``{task: [t_c per class]}`` for every thresholded task
    (one value for a binary map), from ``eval.threshold``, or for a multi-label task the
    per-class thresholds tuned on validation and kept in ``checkpoint`` (``eval.thresholds:
    tune``). Prediction and export read a run's thresholds here and nowhere else."""
    from moekit.engine.eval_run import tuned_thresholds

    threshold = float(settings(cfg, "eval")["threshold"])
    tuned = (tuned_thresholds(cfg, checkpoint) if checkpoint is not None else None) or {}
    return {
        name: tuned.get(name)
        or [threshold] * (task.num_classes if task.kind == "multilabel" else 1)
        for name, task in tasks.items()
        if thresholded(task)
    }


def layer_owner(layer: str, task_names: Sequence[str]) -> str | None:
    """The task a MoE layer belongs to when its module path names it (``heads.rg``: one
    task's head, as moekit's models keep per-task modules keyed by task name), else ``None``."""
    named = [part for part in layer.split(".") if part in task_names]
    return named[0] if len(named) == 1 else None


def _record_rows(record: RoutingRecord, task_names: Sequence[str]) -> dict[str, Tensor]:
    """The valid rows of a record by task: all of them for the task whose module the layer is
    (:func:`layer_owner`), by task id where the rows carry the run's task ids, else all
    under :data:`SHARED`."""
    rows = torch.arange(record.routing.index.shape[0], device=record.routing.index.device)
    if record.valid is not None:
        rows = rows[record.valid.reshape(-1).to(rows.device)]
    owner = layer_owner(record.layer, task_names)
    if owner is not None:
        return {owner: rows}
    ids = record.task_ids
    if ids is None or ids.numel() == 0 or int(ids.max()) >= len(task_names):
        return {SHARED: rows}
    ids = ids.reshape(-1).to(rows.device)[rows]
    return {task_names[t]: rows[ids == t] for t in torch.unique(ids).tolist()}


def describe_selection(selected: Tensor) -> str:
    """The experts of ``selected [n, E]`` (bool, one row per token), most used first: their
    ids (``0 2``) when one token chose, else ``id=share`` with the share of the tokens that
    chose each (``3=0.62 0=0.41``)."""
    counts = selected.sum(dim=0).double()
    tokens = selected.shape[0]
    order = sorted((e for e in range(counts.numel()) if counts[e] > 0), key=lambda e: -counts[e])
    if tokens == 1:
        return " ".join(str(e) for e in order)
    return " ".join(f"{e}={float(counts[e]) / tokens:.2f}" for e in order)


def selected_experts(records: Sequence[RoutingRecord], task_names: Sequence[str]) -> dict[str, str]:
    """``{task or SHARED: "layer:experts; layer:experts"}`` of one input's forward
    (:func:`describe_selection` per layer); tasks a layer did not route are left out."""
    parts: dict[str, list[str]] = {}
    for record in records:
        selected = record.routing.selected_mask()
        for key, rows in _record_rows(record, task_names).items():
            if rows.numel():
                chosen = describe_selection(selected[rows].cpu())
                parts.setdefault(key, []).append(f"{record.layer}:{chosen}")
    return {key: "; ".join(values) for key, values in parts.items()}


@dataclass
class TaskPrediction:
    """What the model predicts for one task on one input.

    ``probs``: image-level probabilities ``[C]`` (a regression task's values); ``map``: a
    dense task's probabilities (or values) on the photograph's pixels, ``[H, W]`` for one
    channel, ``[H, W, C]`` otherwise (``None`` where the modality it is drawn on is missing);
    ``decision``: the class index, the 0/1 positives, the mask (``uint8`` 0/1) or label map,
    or the values; ``experts``: :func:`selected_experts`' text for the task.
    """

    probs: np.ndarray | None = None
    map: np.ndarray | None = None
    decision: Any = None
    experts: str = ""


@dataclass
class Prediction:
    """The predictions of one input: per task, the shared layers' experts, and the input as
    read (its photograph and geometry, for figures), with the modality the dense maps are on."""

    item: InputItem
    tasks: dict[str, TaskPrediction]
    loaded: LoadedInput
    dense_modality: str | None
    shared_experts: str = ""


class Predictor:
    """A model with its tasks, input pipeline and thresholds, predicting one input at a time.

    Args:
        model: a moekit model (put in eval mode, moved to ``device``).
        tasks: its tasks, in its order.
        pipeline: how its inputs are read.
        thresholds: :func:`decision_thresholds` of the run.
        tta: ``none`` or ``flip``.
        device: where the model runs.
    """

    def __init__(
        self,
        model: nn.Module,
        tasks: Mapping[str, Task],
        pipeline: InputPipeline,
        thresholds: Mapping[str, Sequence[float]],
        tta: str = "none",
        device: str | torch.device = "cpu",
    ) -> None:
        if tta not in TTA_MODES:
            raise ConfigError(f"--tta: expected one of {', '.join(TTA_MODES)}, got {tta!r}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tasks = dict(tasks)
        self.pipeline = pipeline
        self.thresholds = {name: [float(t) for t in values] for name, values in thresholds.items()}
        self.tta = tta
        self._steps: dict[str, PreprocessStep] = pipeline.steps()

    def predict_file(self, path: str | Path | Mapping[str, str | Path | None]) -> Prediction:
        """Predict one file, or ``{modality: file or None}`` for a multi-modal model."""
        given = dict(path) if isinstance(path, Mapping) else {self.pipeline.specs[0].name: path}
        unknown = [name for name in given if name not in self.pipeline.names]
        if unknown:
            raise ConfigError(
                f"predict: no modality '{unknown[0]}'; the model takes "
                f"{', '.join(self.pipeline.names)}{did_you_mean(unknown[0], self.pipeline.names)}"
            )
        paths = {name: None if p is None else Path(p) for name, p in given.items()}
        first = next((p for p in paths.values() if p is not None), None)
        if first is None:
            raise ConfigError("predict: no file given")
        return self.predict(InputItem(safe_id(first.stem), paths, str(first)))

    def load(self, item: InputItem) -> LoadedInput:
        """Read ``item`` (a one-line :class:`~moekit.errors.DataError` if a file cannot be)."""
        return self.pipeline.load(item, self._steps)

    @torch.no_grad()
    def probabilities(self, loaded: LoadedInput) -> tuple[dict[str, Tensor], list[RoutingRecord]]:
        """``({task: probabilities [C, ...]}, routing records)`` of one loaded input."""
        batch = loaded.batch.to(self.device)
        output = run_model(self.model, batch)
        if self.tta == "none":
            probs = {
                name: task_probabilities(self.tasks[name], logits)
                for name, logits in output.preds.items()
            }
        else:
            probs = predict_probabilities(self.model, batch, self.tasks, self.tta)
        return {name: p[0].cpu() for name, p in probs.items()}, output.routing

    def predict(self, item: InputItem) -> Prediction:
        """Read, run and decide for one input."""
        loaded = self.load(item)
        probs, records = self.probabilities(loaded)
        experts = selected_experts(records, list(self.tasks))
        modality = self._dense_modality(probs)
        source = loaded.modalities.get(modality) if modality is not None else None
        results = {}
        for name, task in self.tasks.items():
            if name not in probs:
                continue
            result = TaskPrediction(experts=experts.get(name, ""))
            if task.is_dense and modality is None:  # no image to draw on: the model's grid
                result.map = self._on_photograph(probs[name], None, None)
            elif task.is_dense and source is not None:
                size = self.pipeline.spec(modality).size
                result.map = self._on_photograph(probs[name], size, source.full_geometry)
            elif not task.is_dense:
                result.probs = probs[name].float().numpy().reshape(-1)
            result.decision = self._decide(name, task, result)
            results[name] = result
        return Prediction(item, results, loaded, modality, experts.get(SHARED, ""))

    def _dense_modality(self, probs: Mapping[str, Tensor]) -> str | None:
        """The image modality dense maps are drawn on: the first whose input size is the
        maps' size, else the first image modality."""
        images = [s for s in self.pipeline.specs if s.kind == "image"]
        dense = [p for name, p in probs.items() if self.tasks[name].is_dense]
        if not images or not dense:
            return None
        size = tuple(dense[0].shape[-2:])
        return next((s.name for s in images if s.size == size), images[0].name)

    @staticmethod
    def _on_photograph(
        probs: Tensor, size: tuple[int, int] | None, geometry: Geometry | None
    ) -> np.ndarray:
        """``[C, h, w]`` -> the photograph's pixels: ``[H, W]`` for one channel, else
        ``[H, W, C]`` (kept at the model's resolution without a geometry)."""
        maps = probs.float()
        if size is not None and tuple(maps.shape[-2:]) != tuple(size):
            maps = F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0]
        array = maps.permute(1, 2, 0).numpy()
        if geometry is not None:
            array = to_original(np.ascontiguousarray(array), geometry)
            array = array if array.ndim == 3 else array[..., None]
        return array[..., 0] if array.shape[2] == 1 else array

    def _decide(self, name: str, task: Task, result: TaskPrediction) -> Any:
        if task.is_dense:
            if result.map is None:
                return None
            if task.kind != "segmentation":
                return result.map
            if task.num_classes == 1:
                mask = above_threshold(torch.from_numpy(result.map), self.thresholds[name][0])
                return mask.numpy().astype(np.uint8)
            return result.map.argmax(axis=2).astype(np.int64)
        if task.kind == "multiclass":
            return int(np.argmax(result.probs))
        if task.kind == "multilabel":
            limits = torch.tensor(self.thresholds[name], dtype=torch.float64)
            probs = torch.from_numpy(result.probs).double()[None]  # [1, C]: classes on dim 1
            return above_threshold(probs, limits)[0].numpy()
        return result.probs
