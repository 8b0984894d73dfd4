"""The overlay figure of one predicted input (``overlays/<id>.png``).

Panels, left to right: the photograph, titled with its id and the image-level predictions
(``rg: 2 moderate (0.61)``); the photograph with every binary mask filled and outlined in its
task's colour (:data:`moekit.analysis.predictions.TASK_COLOURS`, the colours of the flagship's
prediction figures: MA cyan, HE lime, EX magenta, SE blue, OD black) with a legend; one panel
per multi-class map (a colour per class) and per dense regression map (a heat map with its
colour bar). The photograph is drawn as decoded, at most :data:`DISPLAY_SIDE` pixels on its
longer side, and the masks are brought to it by nearest neighbour.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import cv2
import numpy as np

from moekit.analysis.figures import save_figure
from moekit.analysis.predictions import OVERLAY_ALPHA, class_colour, class_name, task_colours
from moekit.engine.curves import pyplot
from moekit.inference.predictor import Prediction, TaskPrediction
from moekit.types import Task

DISPLAY_SIDE = 800
PANEL_INCHES = 4.0


def _display(image: np.ndarray) -> np.ndarray:
    """``image`` reduced to at most :data:`DISPLAY_SIDE` px on its longer side."""
    factor = DISPLAY_SIDE / max(image.shape[:2])
    if factor >= 1:
        return image
    size = (max(1, round(image.shape[1] * factor)), max(1, round(image.shape[0] * factor)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _fit(array: np.ndarray, shape: tuple[int, ...], nearest: bool) -> np.ndarray:
    """``array`` resized to ``shape[:2]`` (nearest neighbour for masks and label maps)."""
    if array.shape[:2] == shape[:2]:
        return array
    data = array.astype(np.uint16) if nearest else array.astype(np.float32)
    interpolation = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA
    return cv2.resize(data, (shape[1], shape[0]), interpolation=interpolation)


def image_level_text(name: str, task: Task, result: TaskPrediction) -> str:
    """``rg: 2 moderate (0.61)``; ``diagnosis: D (0.81) G (0.62)`` (``none``); ``age: 0.58``."""
    if task.kind == "multiclass":
        index = int(result.decision)
        return f"{name}: {class_name(task, index)} ({float(result.probs[index]):.2f})"
    if task.kind == "multilabel":
        on = [
            f"{class_name(task, c)} ({float(result.probs[c]):.2f})"
            for c, v in enumerate(result.decision)
            if v
        ]
        return f"{name}: {' '.join(on) or 'none'}"
    return f"{name}: " + ", ".join(f"{float(v):.3g}" for v in result.probs)


def _fill(ax, regions: list[tuple[np.ndarray, tuple[float, float, float]]]) -> None:
    """Fill every region (``bool [h, w]``) in its colour (a later region over an earlier one
    where they overlap), then outline each, so overlapping masks all stay visible."""
    shown = np.zeros((*regions[0][0].shape, 4)) if regions else None
    for region, colour in regions:
        shown[region] = (*colour, OVERLAY_ALPHA)
    if shown is not None:
        ax.imshow(shown)
    for region, colour in regions:
        if region.any():
            ax.contour(region, levels=[0.5], colors=[colour], linewidths=1.0)


def plot_overlay(prediction: Prediction, tasks: Mapping[str, Task], path: Path) -> Path | None:
    """Draw the overlay figure of ``prediction`` to ``path`` (``None``: the input has no
    photograph to draw, e.g. a volume alone)."""
    from matplotlib.patches import Patch

    modality = prediction.dense_modality
    source = prediction.loaded.modalities.get(modality) if modality else None
    if source is None:
        source = next(
            (
                m
                for m in prediction.loaded.modalities.values()
                if m is not None and m.decoded is not None
            ),
            None,
        )
    if source is None or source.decoded is None:
        return None
    image = _display(source.decoded)
    results = prediction.tasks
    binary = {
        n: c
        for n, c in task_colours(tasks).items()
        if n in results and results[n].decision is not None
    }
    dense = [
        n
        for n, t in tasks.items()
        if n in results and t.is_dense and n not in binary and results[n].decision is not None
    ]
    panels = 1 + bool(binary) + len(dense)
    plt = pyplot()
    fig, axes = plt.subplots(
        1, panels, figsize=(PANEL_INCHES * panels, PANEL_INCHES * 0.9), squeeze=False
    )
    axes = list(axes[0])
    lines = [prediction.item.id] + [
        image_level_text(n, tasks[n], r) for n, r in results.items() if not tasks[n].is_dense
    ]
    axes[0].imshow(image)
    axes[0].set_title("\n".join(lines), fontsize=9)
    next_ax = 1
    if binary:
        ax = axes[next_ax]
        ax.imshow(image)
        _fill(
            ax,
            [(_fit(results[n].decision, image.shape, True) > 0, c) for n, c in binary.items()],
        )
        handles = [Patch(color=colour, label=name) for name, colour in binary.items()]
        ax.legend(handles=handles, loc="lower right", fontsize=7, framealpha=0.7)
        ax.set_title("masks", fontsize=9)
        next_ax += 1
    for name in dense:
        ax, task = axes[next_ax], tasks[name]
        decision = results[name].decision
        if task.kind == "segmentation":
            ax.imshow(image)
            labels = _fit(decision, image.shape, True)
            classes = range(1, task.num_classes)
            _fill(ax, [(labels == c, class_colour(c, task.num_classes)) for c in classes])
        else:
            values = _fit(np.asarray(decision, np.float32), image.shape, False)
            values = values if values.ndim == 2 else values[..., 0]
            fig.colorbar(ax.imshow(values, cmap="viridis"), ax=ax, fraction=0.046, pad=0.04)
        ax.set_title(name, fontsize=9)
        next_ax += 1
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    return save_figure(fig, Path(path))
