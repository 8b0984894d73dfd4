"""Grad-CAM: where a trained model looks for a class, for any classification model of moekit,
and through each expert of an MoE head.

Grad-CAM (Selvaraju et al., ICCV 2017) ``L_c = ReLU(Σ_k α_k A_k)``, ``α_k`` the spatial mean of
``∂y_c / ∂A_k`` (:mod:`moekit.nn.cam`: the layer, transformer tokens on their grid), divided by
its maximum per image and upsampled (bilinear) to the image.

**Per expert.** In a model whose MoE layers hold their experts as modules (the label-routed
head of ``transfer_classifier``, the IDRiD heads), the map *through expert e* is Grad-CAM of
the same logit with every other expert's output and the router's combine weights held
constant (detached): the gradient reaches the layer through expert ``e`` alone, weighted by its
combine weight. The experts' maps before the ReLU add up to the map with the routing held
fixed; an expert the sample's routing did not select has a zero map. This shows whether the
experts attend to different regions.

Every hook this module installs is removed when it returns, also when the model raises. The
model's mode and ``requires_grad`` flags are left as they were.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.errors import ConfigError, did_you_mean
from moekit.moe import MoELayer
from moekit.nn.cam import CamLayer, find_cam_layer, to_grid, weighted_map
from moekit.routing.types import Routing, RoutingRecord
from moekit.types import ModelOutput


@dataclass
class CamResult:
    """Class-activation maps of a batch.

    Attributes:
        maps: ``[B, K, H, W]`` in ``[0, 1]`` at the images' size, for the ``K`` classes asked.
        logits: ``[B, C]`` the task's logits.
        classes: the class indices of the ``K`` maps.
        layer: the module path the maps were taken at.
        expert_maps: ``[B, K, E, H, W]`` the map through each expert (``experts=True``).
        expert_weights: ``[B, K, E]`` each expert's combine weight for the sample and class
            (0: not selected).
    """

    maps: Tensor
    logits: Tensor
    classes: list[int]
    layer: str
    expert_maps: Tensor | None = None
    expert_weights: Tensor | None = None


@contextmanager
def hooked(handles: list[Any]) -> Iterator[list[Any]]:
    """Remove every hook handle appended to ``handles`` on exit, however the block ends."""
    try:
        yield handles
    finally:
        for handle in handles:
            handle.remove()
        handles.clear()


def cam_from(activation: Tensor, gradient: Tensor, size: Sequence[int]) -> Tensor:
    """``ReLU(Σ_k α_k A_k)`` (:func:`moekit.nn.cam.weighted_map`) upsampled to ``size`` and
    divided by its maximum per image (an all-zero map stays zero): ``[B, H, W]``."""
    cam = F.relu(weighted_map(activation, gradient)).unsqueeze(1)
    cam = F.interpolate(cam, size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(dim=1).clamp(min=1e-12).view(-1, 1, 1)
    return (cam / peak).clamp(0, 1)


def _expert_layers(model: nn.Module) -> list[MoELayer]:
    return [
        m
        for m in model.modules()
        if isinstance(m, MoELayer) and isinstance(getattr(m, "experts", None), nn.ModuleList)
    ]


def _hold_routing(_module: nn.Module, _inputs: Any, routing: Routing) -> Routing:
    """Forward hook of a router: the same routing with constant scores and weights."""
    return Routing(
        routing.probs.detach(), routing.logits.detach(), routing.index, routing.weight.detach()
    )


def _detach_output(_module: nn.Module, _inputs: Any, output: Tensor) -> Tensor:
    return output.detach()


def expert_weights(record: RoutingRecord, batch: int, label: int) -> Tensor:
    """``[B, E]`` the combine weight of each expert for each sample's class ``label``.

    A layer routing one row per sample gives that row's weights; one routing ``R > 1`` rows per
    sample with ``task_ids`` in ``0..R-1`` (a label-routed head: a row per label) gives the row
    whose id is ``label``; otherwise the mean over the sample's rows."""
    dense = record.routing.dense_weight().detach().float()
    rows = dense.shape[0] // batch
    dense = dense.view(batch, rows, -1)
    ids = record.task_ids
    if rows > 1 and ids is not None and ids.numel() == batch * rows:
        chosen = ids.view(batch, rows).to(dense.device) == label
        if bool(chosen.sum(dim=1).eq(1).all()):
            return (dense * chosen.unsqueeze(-1)).sum(dim=1)
    return dense.mean(dim=1)


def grad_cam(
    model: nn.Module,
    images: Tensor,
    task: str,
    classes: Sequence[int] | None = None,
    layer: str | None = None,
    experts: bool = False,
    forward: Callable[[nn.Module, Tensor], ModelOutput] | None = None,
) -> CamResult:
    """Grad-CAM maps of ``task``'s ``classes`` (default all) for a batch of ``images``.

    Args:
        model: any moekit model; run in eval mode (restored afterwards).
        images: ``[B, 3, H, W]`` model inputs.
        task: the classification or multi-label task whose logits ``[B, C]`` are explained.
        classes: class indices (default: every class).
        layer: the module path of the layer (default: :func:`find_cam_layer`).
        experts: also the map through each expert of the model's MoE layers with module
            experts (the module docstring); an error for a model without such a layer.
        forward: how to call the model (default ``model(images)``).

    Returns:
        A :class:`CamResult`.
    """
    target = find_cam_layer(model, layer)
    call = forward or (lambda net, x: net(x))
    size = images.shape[-2:]
    was_training = model.training
    moe = _expert_layers(model) if experts else []
    if experts and not moe:
        raise ConfigError(
            f"--experts: {type(model).__name__} has no MoE layer whose experts are modules"
        )
    model.eval()
    try:
        with torch.enable_grad():
            activation, out = _forward(model, images, target, call)
            logits = _task_logits(out, task)
            chosen = list(range(logits.shape[1])) if classes is None else [int(c) for c in classes]
            for c in chosen:
                if not 0 <= c < logits.shape[1]:
                    raise ConfigError(
                        f"--class: {c} is not a class of '{task}' (0..{logits.shape[1] - 1})"
                    )
            grid = to_grid(activation, target, size)
            maps = []
            for c in chosen:
                (gradient,) = torch.autograd.grad(logits[:, c].sum(), activation, retain_graph=True)
                maps.append(cam_from(grid.detach(), to_grid(gradient, target, size), size))
            result = CamResult(torch.stack(maps, dim=1), logits.detach(), chosen, target.name)
            if moe:
                result.expert_maps, result.expert_weights = _per_expert(
                    model, images, target, call, task, chosen, moe, out
                )
    finally:
        model.train(was_training)
    return result


def _task_logits(out: ModelOutput, task: str) -> Tensor:
    if task not in out.preds:
        names = list(out.preds)
        raise ConfigError(
            f"--task: the model has no task '{task}'{did_you_mean(task, names)}; tasks: "
            f"{', '.join(names)}"
        )
    logits = out.preds[task]
    if logits.dim() != 2:
        raise ConfigError(
            f"--task: '{task}' predicts maps {tuple(logits.shape)}; Grad-CAM explains per-image "
            "classes [B, C]"
        )
    return logits


def _forward(
    model: nn.Module,
    images: Tensor,
    target: CamLayer,
    call: Callable[[nn.Module, Tensor], ModelOutput],
    install: Callable[[list[Any]], None] = lambda handles: None,
) -> tuple[Tensor, ModelOutput]:
    """Run the model with the layer's output made a leaf that requires a gradient (so the
    maps need no gradient of any parameter); ``install`` appends further hook handles, all
    removed after the call."""
    kept: list[Tensor] = []

    def keep(_module: nn.Module, _inputs: Any, output: Any) -> Tensor:
        if not isinstance(output, Tensor):
            raise ValueError(f"grad_cam: layer '{target.name}' returns {type(output).__name__}")
        leaf = output.detach().requires_grad_(True)
        kept.append(leaf)
        return leaf

    with hooked([]) as handles:
        handles.append(target.module.register_forward_hook(keep))
        install(handles)
        out = call(model, images)
    if not kept:
        raise ValueError(f"grad_cam: layer '{target.name}' did not run in the forward pass")
    return kept[-1], out


def _per_expert(
    model: nn.Module,
    images: Tensor,
    target: CamLayer,
    call: Callable[[nn.Module, Tensor], ModelOutput],
    task: str,
    chosen: Sequence[int],
    layers: Sequence[MoELayer],
    out: ModelOutput,
) -> tuple[Tensor, Tensor]:
    size = images.shape[-2:]
    count = max(len(layer.experts) for layer in layers)
    names = {layer.name for layer in layers}
    records = [r for r in out.routing if r.layer in names]
    weights = torch.zeros(images.shape[0], len(chosen), count)
    for k, c in enumerate(chosen):
        for record in records:
            found = expert_weights(record, images.shape[0], c)
            weights[:, k, : found.shape[1]] += found.cpu() / len(records)
    maps = torch.zeros(images.shape[0], len(chosen), count, *size)
    for e in range(count):

        def install(handles: list[Any], e: int = e) -> None:
            for layer in layers:
                handles.append(layer.router.register_forward_hook(_hold_routing))
                for i, expert in enumerate(layer.experts):
                    if i != e:
                        handles.append(expert.register_forward_hook(_detach_output))

        activation, expert_out = _forward(model, images, target, call, install)
        logits = _task_logits(expert_out, task)
        grid = to_grid(activation, target, size).detach()
        for k, c in enumerate(chosen):
            (gradient,) = torch.autograd.grad(
                logits[:, c].sum(), activation, retain_graph=True, allow_unused=True
            )
            if gradient is not None:
                maps[:, k, e] = cam_from(grid, to_grid(gradient, target, size), size).cpu()
    return maps, weights


def mass_inside(maps: Tensor, masks: Tensor) -> Tensor:
    """The share of each map's mass inside its mask: ``Σ cam · mask / Σ cam`` per map
    (``maps``, ``masks``: ``[..., H, W]``; NaN for an all-zero map)."""
    total = maps.flatten(-2).sum(-1)
    inside = (maps * masks.to(maps.dtype)).flatten(-2).sum(-1)
    return torch.where(total > 0, inside / total.clamp(min=1e-12), torch.nan)
