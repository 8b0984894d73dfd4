"""Class-activation maps of a trained run on a split or on image files (``moekit cam``).

:func:`cam_run` loads a run's checkpoint, reads the images — a split's samples without
augmentation, or files through the run's input pipeline (its preprocess step and normalisation,
:mod:`moekit.inference.inputs`) — and draws for each image one figure
``OUT/<id>.png``: the image, then one panel per class asked with its Grad-CAM map
(:func:`moekit.analysis.gradcam.grad_cam`) over it, the predicted probability, the decision
(at the run's thresholds: tuned per class with ``eval.thresholds: tune``, else
``eval.threshold``; the arg-max for a multiclass task) and the truth in the title. With
``experts``, a row per class below: the map through each expert of the MoE head with its
combine weight. ``OUT/cam.csv`` lists per image and class the probability, the decision, the
truth, the map's peak position and, with experts, each expert's weight.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from moekit.analysis.figures import pyplot, save_figure
from moekit.analysis.gradcam import CamResult, grad_cam
from moekit.analysis.predictions import display_image
from moekit.data.collate import collate_samples
from moekit.errors import ConfigError, did_you_mean
from moekit.types import Task

OVERLAY_ALPHA = 0.45


@dataclass
class CamImage:
    """One image of a CAM report: its id, model input and truth (None when unlabelled)."""

    id: str
    image: Tensor
    truth: Tensor | None


def choose_task(tasks: dict[str, Task], task: str | None) -> str:
    """``task``, or the run's first per-image classification task."""
    usable = [n for n, t in tasks.items() if t.kind in ("multiclass", "multilabel")]
    if task is None:
        if not usable:
            raise ConfigError("--task: the run has no multiclass or multi-label task")
        return usable[0]
    if task not in usable:
        raise ConfigError(
            f"--task: '{task}' is not a per-image classification task of the run"
            f"{did_you_mean(task, usable)}; valid: {', '.join(usable)}"
        )
    return task


def choose_classes(task: Task, classes: Sequence[str] | None) -> list[int]:
    """Class indices from names or numbers (default: every class)."""
    names = [str(n) for n in task.options.get("class_names") or range(task.num_classes)]
    if not classes:
        return list(range(task.num_classes))
    chosen = []
    for value in classes:
        if value in names:
            chosen.append(names.index(value))
        elif value.isdigit() and int(value) < task.num_classes:
            chosen.append(int(value))
        else:
            raise ConfigError(
                f"--class: '{value}' is not a class of '{task.name}'{did_you_mean(value, names)}"
                f"; valid: {', '.join(names)}"
            )
    return chosen


def decisions(task: Task, logits: Tensor, thresholds: Sequence[float] | float) -> Tensor:
    """``[B, C]`` bool decisions: ``p_c > t_c`` (multi-label) or the arg-max (multiclass)."""
    if task.kind == "multiclass":
        return torch.nn.functional.one_hot(logits.argmax(dim=1), logits.shape[1]).bool()
    values = torch.as_tensor(thresholds, dtype=torch.float64).reshape(-1)
    return torch.sigmoid(logits.double()) > values


def _probabilities(task: Task, logits: Tensor) -> Tensor:
    return logits.softmax(dim=1) if task.kind == "multiclass" else torch.sigmoid(logits)


def _truth_rows(task: Task, truth: Tensor | None) -> list[bool] | None:
    if truth is None:
        return None
    if task.kind == "multiclass":
        return [int(truth) == c for c in range(task.num_classes)]
    return [bool(v > 0.5) for v in truth.reshape(-1)]


def safe_name(value: str) -> str:
    """A file name from an id (``913_right.jpg`` -> ``913_right``)."""
    stem = Path(value).stem if Path(value).suffix else value
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", stem) or "image"


def draw_cam(
    image: Tensor,
    result: CamResult,
    row: int,
    task: Task,
    decided: Tensor,
    truth: list[bool] | None,
    path: Path,
) -> Path:
    """One image's figure: the image, one panel per class, and the per-expert rows."""
    plt = pyplot()
    names = [str(n) for n in task.options.get("class_names") or range(task.num_classes)]
    picture = display_image(image)
    probs = _probabilities(task, result.logits[row : row + 1])[0]
    experts = result.expert_maps is not None
    count = result.expert_maps.shape[2] if experts else 0
    cols = 1 + max(len(result.classes), count)
    rows = 1 + (len(result.classes) if experts else 0)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.6 * rows), squeeze=False)
    axes[0, 0].imshow(picture)
    axes[0, 0].set_title("image", fontsize=9)
    for k, c in enumerate(result.classes):
        ax = axes[0, 1 + k]
        ax.imshow(picture)
        ax.imshow(result.maps[row, k].numpy(), cmap="jet", alpha=OVERLAY_ALPHA, vmin=0, vmax=1)
        said = "yes" if bool(decided[c]) else "no"
        known = "" if truth is None else f", true {'yes' if truth[c] else 'no'}"
        mark = "" if truth is None else (" ✓" if bool(decided[c]) == truth[c] else " ✗")
        ax.set_title(f"{names[c]}: p={float(probs[c]):.2f} → {said}{known}{mark}", fontsize=8)
        if experts:
            for e in range(count):
                panel = axes[1 + k, 1 + e]
                weight = float(result.expert_weights[row, k, e])
                panel.imshow(picture)
                if weight > 0:
                    shown = result.expert_maps[row, k, e].numpy()
                    panel.imshow(shown, cmap="jet", alpha=OVERLAY_ALPHA, vmin=0, vmax=1)
                    panel.set_title(f"{names[c]} via expert {e}: w={weight:.2f}", fontsize=8)
                else:
                    panel.set_title(f"{names[c]}: expert {e} not selected", fontsize=8)
            axes[1 + k, 0].set_axis_off()
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        if not ax.images and ax.get_title() == "":
            ax.set_axis_off()
    fig.suptitle(f"Grad-CAM at {result.layer} ({task.name})", fontsize=10)
    return save_figure(fig, path, tight=True)


def load_cam_images(
    cfg: dict[str, Any],
    task: str,
    images: Sequence[str | Path] | None,
    split: str | None,
    limit: int,
) -> list[CamImage]:
    """The images of a report: files through the run's input pipeline, or the first
    ``limit`` samples of a split (no augmentation)."""
    from moekit.inference.inputs import collect_inputs, pipeline_from_config

    if images:
        pipeline, _ = pipeline_from_config(cfg)
        if pipeline.dict_inputs:
            raise ConfigError("--images: the run takes several modalities; use --split")
        steps = pipeline.steps()
        loaded = [pipeline.load(item, steps) for item in collect_inputs(images, pipeline)]
        return [CamImage(x.item.id, x.batch.inputs[0], None) for x in loaded]
    _, dataset = pipeline_from_config(cfg, split)
    picked = []
    for index in range(min(limit, len(dataset))):
        sample = collate_samples([dataset[index]])
        labelled = bool(sample.labelled(task)[0])
        ids = sample.meta.get("id") if isinstance(sample.meta, dict) else None
        name = str(ids[0]) if ids else f"{split}-{index}"
        truth = sample.targets[task][0] if labelled else None
        picked.append(CamImage(name, sample.inputs[0], truth))
    return picked


def cam_run(
    run_dir: str | Path,
    out: str | Path,
    images: Sequence[str | Path] | None = None,
    split: str | None = None,
    task: str | None = None,
    classes: Sequence[str] | None = None,
    layer: str | None = None,
    experts: bool = False,
    checkpoint: str = "best",
    limit: int = 8,
    batch_size: int = 8,
) -> list[dict[str, Any]]:
    """Grad-CAM figures of a run (see the module docstring); returns the rows of ``cam.csv``."""
    from moekit.engine import checkpoint as ckpt_io
    from moekit.engine.checkpoint import load_model
    from moekit.engine.eval_run import tuned_thresholds
    from moekit.sections import settings

    if (images is None) == (split is None):
        raise ConfigError("moekit cam: give --images FILES or --split SPLIT (one of them)")
    model, cfg, tasks = load_model(run_dir, checkpoint)
    name = choose_task(tasks, task)
    spec = tasks[name]
    chosen = choose_classes(spec, classes)
    tuned = tuned_thresholds(cfg, ckpt_io.checkpoint_dir(run_dir, checkpoint)) or {}
    thresholds = tuned.get(name, settings(cfg, "eval")["threshold"])
    picked = load_cam_images(cfg, name, images, split, limit)
    out = Path(out)
    names = [str(n) for n in spec.options.get("class_names") or range(spec.num_classes)]
    rows: list[dict[str, Any]] = []
    for start in range(0, len(picked), batch_size):
        group = picked[start : start + batch_size]
        batch = torch.stack([p.image for p in group])
        result = grad_cam(model, batch, name, chosen, layer, experts)
        decided = decisions(spec, result.logits, thresholds)
        probs = _probabilities(spec, result.logits)
        for i, item in enumerate(group):
            truth = _truth_rows(spec, item.truth)
            draw_cam(
                item.image, result, i, spec, decided[i], truth, out / f"{safe_name(item.id)}.png"
            )
            for k, c in enumerate(result.classes):
                peak = np.unravel_index(int(result.maps[i, k].argmax()), result.maps.shape[-2:])
                row = {
                    "id": item.id,
                    "class": names[c],
                    "probability": round(float(probs[i, c]), 6),
                    "decision": int(decided[i, c]),
                    "truth": "" if truth is None else int(truth[c]),
                    "peak_y": int(peak[0]),
                    "peak_x": int(peak[1]),
                }
                if result.expert_weights is not None:
                    for e, weight in enumerate(result.expert_weights[i, k].tolist()):
                        row[f"expert_{e}_weight"] = round(weight, 6)
                rows.append(row)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "cam.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["id"])
        writer.writeheader()
        writer.writerows(rows)
    return rows
