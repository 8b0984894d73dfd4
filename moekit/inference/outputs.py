"""What ``moekit predict`` writes per input: a row of ``predictions.csv`` and its mask files.

Columns of ``predictions.csv`` (one row per input, in input order; ``<c>`` is a class name
from ``tasks.<t>.class_names``, else the class index):

=====================  =============================================================
``id``                 the input's id (a CSV's ``id`` column, else the file name's stem)
``input``              its file (``input/<modality>`` per modality of a multi-modal model)
``<t>/prob/<c>``       multiclass, multilabel: the probability of class ``c``
``<t>/class``          multiclass: the predicted class index (the most probable)
``<t>/name``           multiclass with class names: the predicted class's name
``<t>/positive/<c>``   multilabel: 1 when ``p_c > t_c`` (the run's threshold), else 0
``<t>/labels``         multilabel: the positive classes, space-separated
``<t>/mask``           segmentation: the mask PNG (``masks/<id>_<t>.png``), at the
                       input's original resolution: 0/255 for a binary task, the class
                       index per pixel for a multi-class map
``<t>/area``           segmentation: the share of the photograph's pixels in the mask
                       (multi-class: not background)
``<t>/prob_max``       binary segmentation: the largest pixel probability
``<t>/value``          regression: the predicted value (``<t>/value/<i>`` for several)
``<t>/map``            dense regression: ``maps/<id>_<t>.npy`` (float32, original size)
``<t>/experts``        MoE models: per MoE layer the experts the task's gate selected
                       (``layer:ids``; ``id=share`` of the tokens where a layer routes
                       several tokens per input)
``experts``            layers that route every task alike
=====================  =============================================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from moekit.fileio import atomic_write_text
from moekit.inference.predictor import Prediction, TaskPrediction
from moekit.types import Task

MASKS = "masks"
MAPS = "maps"
OVERLAYS = "overlays"
CSV_NAME = "predictions.csv"


def class_label(task: Task, index: int) -> str:
    """Class ``index`` as a column suffix: its name where the task has class names."""
    names = task.options.get("class_names")
    return str(names[index]) if names and index < len(names) else str(index)


def mask_image(task: Task, decision: np.ndarray) -> Image.Image:
    """A mask as a PNG image: a binary mask 0/255, a label map its class indices (8-bit up
    to 256 classes, else 16-bit)."""
    if task.num_classes == 1:
        return Image.fromarray((decision > 0).astype(np.uint8) * 255, mode="L")
    if task.num_classes <= 256:
        return Image.fromarray(decision.astype(np.uint8), mode="L")
    return Image.fromarray(decision.astype(np.uint16), mode="I;16")


def write_files(prediction: Prediction, tasks: Mapping[str, Task], out: Path) -> dict[str, str]:
    """Write the masks (PNG) and dense regression maps (``.npy``) of one input under ``out``;
    returns ``{task: path relative to out}``."""
    written: dict[str, str] = {}
    for name, result in prediction.tasks.items():
        task = tasks[name]
        if not task.is_dense or result.decision is None:
            continue
        if task.kind == "segmentation":
            relative = Path(MASKS) / f"{prediction.item.id}_{name}.png"
            (out / MASKS).mkdir(parents=True, exist_ok=True)
            mask_image(task, result.decision).save(out / relative)
        else:
            relative = Path(MAPS) / f"{prediction.item.id}_{name}.npy"
            (out / MAPS).mkdir(parents=True, exist_ok=True)
            np.save(out / relative, np.asarray(result.map, dtype=np.float32))
        written[name] = relative.as_posix()
    return written


def _task_columns(
    name: str, task: Task, result: TaskPrediction, file: str | None
) -> dict[str, Any]:
    row: dict[str, Any] = {}
    if task.kind in ("multiclass", "multilabel"):
        for c, p in enumerate(result.probs):
            row[f"{name}/prob/{class_label(task, c)}"] = float(p)
    if task.kind == "multiclass":
        row[f"{name}/class"] = int(result.decision)
        if task.options.get("class_names"):
            row[f"{name}/name"] = class_label(task, int(result.decision))
    elif task.kind == "multilabel":
        positive = [int(v) for v in result.decision]
        for c, value in enumerate(positive):
            row[f"{name}/positive/{class_label(task, c)}"] = value
        row[f"{name}/labels"] = " ".join(class_label(task, c) for c, v in enumerate(positive) if v)
    elif task.kind == "segmentation":
        row[f"{name}/mask"] = file or ""
        if result.decision is not None:
            row[f"{name}/area"] = float((result.decision > 0).mean())
            if task.num_classes == 1:
                row[f"{name}/prob_max"] = float(result.map.max())
    elif task.is_dense:
        row[f"{name}/map"] = file or ""
    else:
        values = [float(v) for v in result.probs]
        if len(values) == 1:
            row[f"{name}/value"] = values[0]
        else:
            row.update({f"{name}/value/{i}": v for i, v in enumerate(values)})
    if result.experts:
        row[f"{name}/experts"] = result.experts
    return row


def prediction_row(
    prediction: Prediction, tasks: Mapping[str, Task], files: Mapping[str, str], multimodal: bool
) -> dict[str, Any]:
    """The ``predictions.csv`` row of one input (see the module docstring)."""
    row: dict[str, Any] = {"id": prediction.item.id}
    for modality in prediction.loaded.modalities:
        path = prediction.item.paths.get(modality)
        row["input" if not multimodal else f"input/{modality}"] = "" if path is None else str(path)
    for name, result in prediction.tasks.items():
        row.update(_task_columns(name, tasks[name], result, files.get(name)))
    if prediction.shared_experts:
        row["experts"] = prediction.shared_experts
    return row


def write_predictions_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """``predictions.csv`` from the rows (columns in the order they first appear)."""
    return atomic_write_text(path, pd.DataFrame(list(rows)).to_csv(index=False))
