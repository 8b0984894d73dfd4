"""Prediction overlays: image, ground truth and prediction of every dense task, for a few images.

Like the IDRiD seed's Figures 4 and 5: one row per image; the first column is the image with
the image-level predictions in its title (``pred / true``, ``-1`` where the image has no
label, as for IDRiD's segmentation images without a grade); then for every dense task the
ground truth and the prediction over the image. Binary masks are thresholded at 0.5 (sigmoid of
the logits), multi-class maps take the arg-max (one colour per class), dense regression maps
are drawn as heat maps. A task without ground truth on an image shows the bare image.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from moekit.analysis.figures import pyplot
from moekit.data.collate import collate_samples
from moekit.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from moekit.types import Task

OVERLAY_ALPHA = 0.5
BINARY_COLOUR = (1.0, 0.9, 0.0)


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


def dense_map(task: Task, value: Tensor, is_target: bool) -> np.ndarray:
    """A prediction or target of a dense task as a label map (segmentation) or values."""
    if task.kind != "segmentation":
        return value.float().reshape(-1, *value.shape[-2:])[0].numpy()
    if value.dim() == 2:  # class-index target
        return value.long().numpy()
    if value.shape[0] == 1:  # binary: logits or a 0/1 mask
        probs = value[0].float() if is_target else value[0].float().sigmoid()
        return (probs >= 0.5).long().numpy()
    if is_target:
        return value.float().argmax(dim=0).numpy() * (value.float().amax(dim=0) > 0).numpy()
    return value.float().argmax(dim=0).numpy()


def image_label(task: Task, value: Tensor, is_target: bool) -> str:
    """An image-level prediction or target as text."""
    if task.kind == "multiclass":
        return str(int(value.argmax())) if not is_target else str(int(value))
    if task.kind == "multilabel":
        on = (value.float() >= 0.5) if is_target else (value.float().sigmoid() >= 0.5)
        return ",".join(str(i) for i in on.nonzero().flatten().tolist()) or "none"
    return ", ".join(f"{v:.2f}" for v in value.float().flatten().tolist())


def class_colour(label: int, num_classes: int) -> tuple[float, float, float]:
    """Overlay colour of a class: yellow for a binary mask, tab10 colours otherwise."""
    if num_classes <= 2:
        return BINARY_COLOUR
    return tuple(pyplot().get_cmap("tab10")((label - 1) % 10)[:3])


def _overlay(ax, image: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
    """The image with every non-zero class filled in its colour and outlined."""
    ax.imshow(image)
    shown = np.zeros((*labels.shape, 4))
    for c in np.unique(labels):
        if c > 0:
            colour = class_colour(int(c), num_classes)
            shown[labels == c] = (*colour, OVERLAY_ALPHA)
            ax.contour(labels == c, levels=[0.5], colors=[colour], linewidths=1.2)
    ax.imshow(shown)


def _legend(ax, task: Task) -> None:
    """Class colours of a multi-class segmentation task (class names if the config has them)."""
    from matplotlib.patches import Patch

    names = task.options.get("class_names") or [str(c) for c in range(task.num_classes)]
    handles = [
        Patch(color=class_colour(c, task.num_classes), label=str(names[c]))
        for c in range(1, task.num_classes)
    ]
    ax.legend(handles=handles, fontsize=6, loc="lower right", framealpha=0.7)


def _draw_dense(
    axes: tuple, task: Task, image: np.ndarray, pred: Tensor, truth: Tensor | None, legend: bool
) -> None:
    """Ground truth and prediction of one dense task on one image: masks over the image,
    value maps as heat maps on one colour scale (with a colour bar)."""
    truth_ax, pred_ax = axes
    prediction = dense_map(task, pred, False)
    target = None if truth is None else dense_map(task, truth, True)
    truth_ax.set_title(f"{task.name}: " + ("no ground truth" if truth is None else "ground truth"))
    pred_ax.set_title(f"{task.name}: prediction")
    if task.kind == "segmentation":
        classes = max(task.num_classes, 2)
        if target is None:
            truth_ax.imshow(image)
        else:
            _overlay(truth_ax, image, target, classes)
        _overlay(pred_ax, image, prediction, classes)
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
    pred_ax.figure.colorbar(shown, ax=pred_ax, fraction=0.046, pad=0.02)


def plot_predictions(
    model: nn.Module,
    dataset: Dataset,
    tasks: Mapping[str, Task],
    path: str | Path,
    num_images: int = 4,
) -> Path:
    """Draw ``num_images`` images spread over ``dataset`` with targets and predictions."""
    plt = pyplot()
    count = min(num_images, len(dataset))
    picks = np.linspace(0, len(dataset) - 1, count).round().astype(int).tolist()
    batch = collate_samples([dataset[i] for i in picks])
    model.eval()
    with torch.no_grad():
        preds = model(batch.inputs).preds
    dense = [name for name, task in tasks.items() if task.is_dense]
    image_level = [name for name in tasks if name not in dense]
    cols = 1 + 2 * len(dense)
    title_lines = max(len(image_level), 1)
    height = 2.4 + 0.15 * title_lines
    fig, axes = plt.subplots(count, cols, figsize=(2.4 * cols, height * count + 0.4), squeeze=False)
    for row in range(count):
        image = display_image(batch.inputs[row])
        labels = []
        for name in image_level:
            labelled = bool(batch.labelled(name)[row])
            true = image_label(tasks[name], batch.targets[name][row], True) if labelled else "-1"
            labels.append(f"{name}: {image_label(tasks[name], preds[name][row], False)} / {true}")
        axes[row, 0].imshow(image)
        axes[row, 0].set_title("\n".join(labels) or f"image {picks[row]}", fontsize=8)
        for i, name in enumerate(dense):
            truth = batch.targets[name][row] if bool(batch.labelled(name)[row]) else None
            axes_pair = (axes[row, 1 + 2 * i], axes[row, 2 + 2 * i])
            _draw_dense(axes_pair, tasks[name], image, preds[name][row], truth, legend=row == 0)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.title.set_fontsize(8)
    fig.suptitle("predictions (image-level: prediction / truth, -1 = no label)", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
