"""CAM-guided training: an entropy penalty on the class-activation maps of the true classes
(``AUX_LOSSES: cam_entropy``).

For each labelled sample ``i`` and each of its true classes ``c`` (the positive labels of a
multi-label task, the target class of a multiclass one), the Grad-CAM map
``M_ic = ReLU(Σ_k α_k A_k)`` (:mod:`moekit.nn.cam`) of the training forward's activations is
made a distribution over the ``hw`` positions and its normalised entropy is the term:

    p_ic = (M_ic + ε) / Σ (M_ic + ε)
    H_ic = −Σ p_ic log p_ic / log(hw)            ∈ [0, 1]
    loss = mean over (i, c) of H_ic

A positive ``weight`` rewards focused maps (low entropy; an all-zero map counts as uniform, the
maximum, so switching a map off does not escape the penalty); a negative one rewards diffuse
maps, as the ODIR study's regulariser did ("broader, smoother activation").

The gradients ``α`` are taken inside the main graph with ``create_graph=True``, so the term is
a differentiable function of the parameters and the optimiser receives its exact gradient —
second order through ``∂y_c/∂A`` included — in the same backward as the task losses. (The ODIR
study's code computed the maps in a separate backward and overwrote the optimiser's gradients.)

The activations are those of the objective's own forward: the loss installs a forward hook on
the layer for the duration of that forward only (:meth:`CamEntropy.watch`), and the objective
calls it with the predictions and the batch (:attr:`CamEntropy.needs_batch`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.errors import ConfigError
from moekit.nn.cam import CamLayer, find_cam_layer, to_grid, weighted_map
from moekit.registry import AUX_LOSSES
from moekit.routing.types import RoutingRecord
from moekit.types import Batch

EPS = 1e-8


def true_class_entropy(
    activation: Tensor,
    logits: Tensor,
    positives: Tensor,
    grid: Callable[[Tensor], Tensor] = lambda t: t,
) -> Tensor:
    """The mean normalised entropy of the true classes' maps (see the module docstring).

    Args:
        activation: the layer's output, part of the graph that produced ``logits``.
        logits: ``[B, C]``.
        positives: ``[B, C]`` bool, the (sample, class) pairs whose map counts.
        grid: turns the activation (and its gradient) into maps ``[B, K, h, w]``.

    Returns:
        A scalar; 0 (connected to the graph) when no pair is positive.
    """
    maps = grid(activation)
    positions = maps.shape[2] * maps.shape[3]
    terms = []
    for c in range(logits.shape[1]):
        rows = positives[:, c]
        if not bool(rows.any()):
            continue
        (gradient,) = torch.autograd.grad(logits[rows, c].sum(), activation, create_graph=True)
        cam = F.relu(weighted_map(maps, grid(gradient)))[rows].flatten(1)
        cam = cam.to(torch.promote_types(cam.dtype, torch.float32)) + EPS  # at least float32
        p = cam / cam.sum(dim=1, keepdim=True)
        terms.append(-(p * p.log()).sum(dim=1) / math.log(max(positions, 2)))
    if not terms:
        return logits.sum() * 0.0
    return torch.cat(terms).mean()


@AUX_LOSSES.register("cam_entropy")
class CamEntropy:
    """The CAM-guided term of ``task`` (see the module docstring), a loss the objective calls
    with its model's forward.

    Args:
        task: the multi-label or multiclass task whose true classes' maps count.
        layer: module path of the maps' layer (default: :func:`moekit.nn.cam.find_cam_layer`).
    """

    needs_batch = True
    """The objective calls it as ``loss(records, preds=..., batch=...)`` inside :meth:`watch`."""

    def __init__(self, task: str, layer: str | None = None) -> None:
        self.task = task
        self.layer = layer
        self._target: CamLayer | None = None
        self._activations: list[Tensor] = []

    def __repr__(self) -> str:
        return f"CamEntropy(task={self.task!r}, layer={self.layer!r})"

    @contextmanager
    def watch(self, model: nn.Module) -> Iterator[None]:
        """Keep the layer's output during one forward of ``model`` (the hook is removed at the
        end of the block, however it ends)."""
        if self._target is None:
            self._target = find_cam_layer(model, self.layer)
        self._activations.clear()

        def keep(_module: nn.Module, _inputs: Any, output: Tensor) -> None:
            if torch.is_grad_enabled() and output.grad_fn is None and output.is_floating_point():
                # a frozen trunk (a head-only stage): the map's gradients still reach the head
                output.requires_grad_(True)
            self._activations.append(output)

        handle = self._target.module.register_forward_hook(keep)
        try:
            yield
        finally:
            handle.remove()

    def __call__(
        self,
        records: Sequence[RoutingRecord],
        *,
        preds: dict[str, Tensor],
        batch: Batch,
    ) -> Tensor:
        if self.task not in preds:
            raise ConfigError(
                f"config key 'aux_losses': cam_entropy task '{self.task}' is not a task of the "
                f"model ({', '.join(preds)})"
            )
        if not self._activations or self._target is None:
            raise ValueError(f"cam_entropy: layer '{self.layer}' did not run in the forward pass")
        activation, target = self._activations[-1], self._target
        self._activations.clear()
        logits = preds[self.task]
        if not torch.is_grad_enabled() or not logits.requires_grad:
            return logits.new_zeros(())  # evaluation: no graph to differentiate
        labels = batch.targets[self.task].to(logits.device)
        labelled = batch.labelled(self.task).to(logits.device)
        if labels.dim() == 1:  # class indices
            positives = F.one_hot(labels.long().clamp(min=0), logits.shape[1]).bool()
        else:
            positives = labels > 0.5
        positives = positives & labelled.unsqueeze(1)
        size = _image_size(batch.inputs)
        with torch.autocast(logits.device.type, enabled=False):
            return true_class_entropy(
                activation, logits.float(), positives, lambda t: to_grid(t, target, size)
            )


def _image_size(inputs: Any) -> tuple[int, int]:
    first = inputs if isinstance(inputs, Tensor) else next(iter(inputs.values()))
    return int(first.shape[-2]), int(first.shape[-1])
