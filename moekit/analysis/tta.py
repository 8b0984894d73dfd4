"""Per-task probabilities of a model, optionally averaged over test-time augmentation.

``tta="flip"`` runs the model on the batch and on its horizontal mirror image, mirrors the
dense predictions of the second run back, and averages the two runs' probabilities:

    p(x) = ½ · (f(x) + F⁻¹ f(F x)),   F = flip of the last (width) axis,

where ``f`` gives probabilities (not logits, whose average is not a probability of either
view) and ``F⁻¹`` flips per-pixel maps back (scalar predictions need no flip). A task whose
label changes under a mirror image (a left/right class, the x component of a normal map) is
not flip-invariant and must not be averaged this way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch
from torch import Tensor

from moekit.errors import ConfigError
from moekit.types import Batch, Task, run_model

TTA_MODES = ("none", "flip")


def task_probabilities(task: Task, logits: Tensor) -> Tensor:
    """Probabilities from a task's raw outputs ``[B, C, ...]``: softmax over classes for
    multiclass tasks and multi-class maps, sigmoid for multilabel tasks and binary maps
    (``C = 1``), the values themselves for regression."""
    if task.kind == "regression":
        return logits.float()
    if task.kind == "multilabel" or (task.kind == "segmentation" and logits.shape[1] == 1):
        return logits.float().sigmoid()
    return logits.float().softmax(dim=1)


def _flip(inputs: Tensor | dict[str, Tensor]) -> Tensor | dict[str, Tensor]:
    if isinstance(inputs, Tensor):
        return inputs.flip(-1)
    return {name: value.flip(-1) for name, value in inputs.items()}


@torch.no_grad()
def predict_probabilities(
    model: torch.nn.Module,
    batch: Batch,
    tasks: Mapping[str, Task],
    tta: str = "none",
    task_mask: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """``{task: probabilities}`` of ``model`` on ``batch`` for every task it predicts.

    Args:
        model: a moekit model (called through :func:`moekit.types.run_model`).
        batch: the inputs (``targets`` are not read).
        tasks: the experiment's tasks, for the activation of each (:func:`task_probabilities`).
        tta: ``none`` or ``flip`` (average with the un-flipped predictions of the mirror
            image; see the module docstring).
        task_mask: passed to the model.
    """
    if tta not in TTA_MODES:
        raise ConfigError(f"--tta: expected one of {', '.join(TTA_MODES)}, got {tta!r}")
    views = [batch] if tta == "none" else [batch, replace(batch, inputs=_flip(batch.inputs))]
    total: dict[str, Tensor] = {}
    for flipped, view in enumerate(views):
        preds = run_model(model, view, task_mask).preds
        for name, logits in preds.items():
            probs = task_probabilities(tasks[name], logits)
            if flipped and tasks[name].is_dense:
                probs = probs.flip(-1)
            total[name] = probs if name not in total else total[name] + probs
    return {name: value / len(views) for name, value in total.items()}
