"""Prediction overlays: image, ground truth and prediction of every dense task, for a few images.

Like the IDRiD paper's Figures 4 and 5: one row per image; the first column is the image with
the image-level predictions in its title (``rg: 2 moderate ✓``, or ``✗ (true 1 mild)``, class
names where the task has ``class_names``, ``no label`` where the image has none, as for IDRiD's
segmentation images without a grade); then for every dense task the ground truth and the
prediction over the image, the columns named once in the first row.
Binary masks are ``sigmoid(logits) > threshold`` (:func:`moekit.metrics.base.above_threshold`,
the metrics' rule; ``threshold`` is ``eval.threshold``, default 0.5), each binary task in its
own colour so that a lesion stays visible on a fundus of any hue; multi-class maps take the
arg-max (one colour per class), dense regression maps are drawn as heat maps on one colour
scale per image (a colour bar beside the prediction). A task without ground truth on an image
shows the bare image, marked "no ground truth". When the dataset tells each sample's source
(``dataset.sources``, as IDRiD's grading and segmentation images), the images are drawn from
every source in turn, so both kinds are shown.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from moekit.analysis.figures import pyplot, save_figure
from moekit.data.collate import collate_samples
from moekit.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from moekit.metrics.base import DEFAULT_THRESHOLD, above_threshold
from moekit.types import Task, run_model

OVERLAY_ALPHA = 0.5
TASK_COLOURS = (
    (0.0, 1.0, 1.0),  # cyan
    (0.3, 1.0, 0.0),  # lime
    (1.0, 0.0, 1.0),  # magenta
    (0.15, 0.35, 1.0),  # blue
    (0.0, 0.0, 0.0),  # black
    (1.0, 1.0, 1.0),  # white
)
"""Colours of the binary dense tasks, in task order (IDRiD: MA cyan, HE lime, EX magenta, SE
blue, OD black over the bright disc): none is the red-orange of a fundus or the yellow of its
exudates."""


def display_image(image: Tensor) -> np.ndarray:
    """``[C, H, W]`` model input -> ``[H, W, 3]`` in ``[0, 1]``: RGB inputs are un-normalised
    with the ImageNet statistics (moekit's transforms' default), others min-max scaled."""
    if image.shape[0] == 3:
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        return (image.float() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    gray = image[0].float()
    gray = (gray - gray.min()) / (gray.max() - gray.min()).clamp(min=1e-8)
    return gray.unsqueeze(-1).expand(-1, -1, 3).numpy()


def dense_map(
    task: Task, value: Tensor, is_target: bool, threshold: float = DEFAULT_THRESHOLD
) -> np.ndarray:
    """A prediction or target of a dense task as a label map (segmentation) or values.

    Binary predictions are ``sigmoid(logits) > threshold``, targets ``mask > 0.5``: the rules
    of the metrics (:func:`moekit.metrics.base.binarize`)."""
    if task.kind != "segmentation":
        return value.float().reshape(-1, *value.shape[-2:])[0].numpy()
    if value.dim() == 2:  # class-index target
        return value.long().numpy()
    if value.shape[0] == 1:  # binary: logits or a 0/1 mask
        if is_target:
            return (value[0].float() > 0.5).long().numpy()
        return above_threshold(value[0].float().sigmoid(), threshold).long().numpy()
    if is_target:
        return value.float().argmax(dim=0).numpy() * (value.float().amax(dim=0) > 0).numpy()
    return value.float().argmax(dim=0).numpy()


def class_name(task: Task, index: int) -> str:
    """``index`` and its name from the task's ``class_names`` (``"2 moderate"``), or ``"2"``."""
    names = task.options.get("class_names")
    if names and 0 <= index < len(names):
        return f"{index} {names[index]}"
    return str(index)


def image_label(
    task: Task, value: Tensor, is_target: bool, threshold: float = DEFAULT_THRESHOLD
) -> str:
    """An image-level prediction or target as text (class names where the task has them)."""
    if task.kind == "multiclass":
        return class_name(task, int(value) if is_target else int(value.argmax()))
    if task.kind == "multilabel":
        on = (
            (value.float() > 0.5)
            if is_target
            else above_threshold(value.float().sigmoid(), threshold)
        )
        return ",".join(class_name(task, i) for i in on.nonzero().flatten().tolist()) or "none"
    return ", ".join(f"{v:.2f}" for v in value.float().flatten().tolist())


def class_colour(label: int, num_classes: int) -> tuple[float, float, float]:
    """Overlay colour of class ``label`` of a multi-class map (tab10 colours)."""
    return tuple(pyplot().get_cmap("tab10")((label - 1) % 10)[:3])


def task_colours(tasks: Mapping[str, Task]) -> dict[str, tuple[float, float, float]]:
    """One colour per binary segmentation task (:data:`TASK_COLOURS`, in task order)."""
    binary = [n for n, t in tasks.items() if t.kind == "segmentation" and t.num_classes <= 2]
    return {name: TASK_COLOURS[i % len(TASK_COLOURS)] for i, name in enumerate(binary)}


def _overlay(
    ax, image: np.ndarray, labels: np.ndarray, num_classes: int, colour: tuple | None = None
) -> None:
    """The image with every non-zero class filled in its colour (``colour`` for a binary map)
    and outlined."""
    ax.imshow(image)
    shown = np.zeros((*labels.shape, 4))
    for c in np.unique(labels):
        if c > 0:
            colour_c = colour if colour is not None else class_colour(int(c), num_classes)
            shown[labels == c] = (*colour_c, OVERLAY_ALPHA)
            ax.contour(labels == c, levels=[0.5], colors=[colour_c], linewidths=1.2)
    ax.imshow(shown)


def _legend(ax, task: Task) -> None:
    """Class colours of a multi-class segmentation task (class names if the config has them),
    below the figure."""
    from matplotlib.patches import Patch

    names = task.options.get("class_names") or [str(c) for c in range(task.num_classes)]
    handles = [
        Patch(color=class_colour(c, task.num_classes), label=str(names[c]))
        for c in range(1, task.num_classes)
    ]
    ax.figure.legend(
        handles=handles,
        title=f"{task.name} classes",
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncols=min(len(handles), 8),
        fontsize=9,
        frameon=False,
    )


def _no_ground_truth(ax) -> None:
    ax.text(
        0.5,
        0.5,
        "no ground truth",
        transform=ax.transAxes,
        ha="center",
        va="center",
        fontsize=9,
        color="white",
        bbox={"facecolor": "black", "alpha": 0.6, "edgecolor": "none"},
    )


def _colour_bar(ax, shown=None) -> None:
    """A colour bar beside ``ax`` (an empty slot of the same width without ``shown``, so the
    ground truth and the prediction panels keep one size)."""
    from mpl_toolkits.axes_grid1 import make_axes_locatable

    slot = make_axes_locatable(ax).append_axes("right", size="5%", pad=0.04)
    if shown is None:
        slot.axis("off")
    else:
        ax.figure.colorbar(shown, cax=slot)
        slot.tick_params(labelsize=7)


def _draw_dense(
    axes: tuple,
    task: Task,
    image: np.ndarray,
    pred: Tensor,
    truth: Tensor | None,
    legend: bool,
    threshold: float = DEFAULT_THRESHOLD,
    colour: tuple | None = None,
) -> None:
    """Ground truth and prediction of one dense task on one image: masks over the image,
    value maps as heat maps on one colour scale (with a colour bar)."""
    truth_ax, pred_ax = axes
    prediction = dense_map(task, pred, False, threshold)
    target = None if truth is None else dense_map(task, truth, True)
    if target is None:
        _no_ground_truth(truth_ax)
    if task.kind == "segmentation":
        classes = max(task.num_classes, 2)
        if target is None:
            truth_ax.imshow(image)
        else:
            _overlay(truth_ax, image, target, classes, colour)
        _overlay(pred_ax, image, prediction, classes, colour)
        if legend and task.num_classes > 2:
            _legend(pred_ax, task)
        return
    maps = [prediction] if target is None else [prediction, target]
    scale = {"vmin": min(m.min() for m in maps), "vmax": max(m.max() for m in maps)}
    if target is None:
        truth_ax.imshow(image)
    else:
        truth_ax.imshow(target, cmap="viridis", **scale)
    shown = pred_ax.imshow(prediction, cmap="viridis", **scale)
    _colour_bar(truth_ax)
    _colour_bar(pred_ax, shown)


def image_title(
    task: Task, pred: Tensor, truth: Tensor | None, threshold: float = DEFAULT_THRESHOLD
) -> str:
    """``rg: 2 moderate ✓``, ``rg: 3 severe ✗ (true 2 moderate)``, ``rg: 3 severe (no label)``;
    a regression value with its truth beside it (``age: 0.61 (true 0.58)``)."""
    predicted = image_label(task, pred, False, threshold)
    if truth is None:
        return f"{task.name}: {predicted} (no label)"
    true = image_label(task, truth, True)
    if task.kind == "regression":
        return f"{task.name}: {predicted} (true {true})"
    if predicted == true:
        return f"{task.name}: {predicted} ✓"
    return f"{task.name}: {predicted} ✗ (true {true})"


def balanced_picks(dataset: Dataset, count: int) -> list[int]:
    """``count`` sample indices spread over ``dataset``, taking the sources in turn.

    With ``dataset.sources`` (one name per sample, e.g. IDRiD's ``grading`` and
    ``segmentation``), each source gives ``count / sources`` images (a source with fewer gives
    all it has and the others make up the difference), spread evenly over that source's
    samples; rows alternate between the sources. Without it, ``count`` indices spread evenly.
    """
    n = len(dataset)
    count = min(count, n)
    sources = getattr(dataset, "sources", None)
    if sources is None or len(sources) != n or len(set(sources)) < 2:
        return np.linspace(0, n - 1, count).round().astype(int).tolist()
    groups: dict[str, list[int]] = {}
    for i, source in enumerate(sources):
        groups.setdefault(source, []).append(i)
    quota = dict.fromkeys(groups, 0)
    while sum(quota.values()) < count:  # one more from each source in turn, while it has any
        for name, members in groups.items():
            if quota[name] < len(members) and sum(quota.values()) < count:
                quota[name] += 1
    chosen = {
        name: [
            members[j] for j in np.linspace(0, len(members) - 1, quota[name]).round().astype(int)
        ]
        for name, members in groups.items()
    }
    picks: list[int] = []
    for row in range(max(quota.values())):
        picks += [chosen[name][row] for name in groups if row < quota[name]]
    return picks


def plot_predictions(
    model: nn.Module,
    dataset: Dataset,
    tasks: Mapping[str, Task],
    path: str | Path,
    num_images: int = 4,
    threshold: float | None = None,
) -> Path:
    """Draw ``num_images`` images of ``dataset`` (:func:`balanced_picks`) with targets and
    predictions; binary masks are ``sigmoid > threshold`` (default
    :data:`~moekit.metrics.base.DEFAULT_THRESHOLD`; pass ``eval.threshold``)."""
    plt = pyplot()
    threshold = DEFAULT_THRESHOLD if threshold is None else float(threshold)
    picks = balanced_picks(dataset, num_images)
    count = len(picks)
    batch = collate_samples([dataset[i] for i in picks])
    model.eval()
    with torch.no_grad():
        preds = run_model(model, batch).preds
    dense = [name for name, task in tasks.items() if task.is_dense]
    image_level = [name for name in tasks if name not in dense]
    colours = task_colours(tasks)
    cols = 1 + 2 * len(dense)
    height = 2.6 + 0.18 * max(len(image_level), 1)
    fig, axes = plt.subplots(count, cols, figsize=(2.6 * cols, height * count + 0.6), squeeze=False)
    for row in range(count):
        image = display_image(batch.inputs[row])
        titles = []
        for name in image_level:
            truth = batch.targets[name][row] if bool(batch.labelled(name)[row]) else None
            titles.append(image_title(tasks[name], preds[name][row], truth, threshold))
        axes[row, 0].imshow(image)
        axes[row, 0].set_title("\n".join(titles) or f"image {picks[row]}", fontsize=9)
        for i, name in enumerate(dense):
            truth = batch.targets[name][row] if bool(batch.labelled(name)[row]) else None
            axes_pair = (axes[row, 1 + 2 * i], axes[row, 2 + 2 * i])
            _draw_dense(
                axes_pair,
                tasks[name],
                image,
                preds[name][row],
                truth,
                legend=row == 0,
                threshold=threshold,
                colour=colours.get(name),
            )
            if row == 0:
                axes_pair[0].set_title(f"{name}\nground truth", fontsize=10)
                axes_pair[1].set_title(f"{name}\nprediction", fontsize=10)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    notes = ["image-level: ✓ right, ✗ wrong"] if image_level else []
    if any(tasks[n].kind == "segmentation" for n in dense):
        notes.append(f"masks: p > {threshold:g}")
    fig.suptitle(f"predictions on {count} images ({'; '.join(notes)})", fontsize=11)
    return save_figure(fig, path, tight=True)
