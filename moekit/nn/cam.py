"""Class-activation maps: the layer they are taken at, its output as maps, and the weighted map.

Grad-CAM (Selvaraju et al., ICCV 2017): with ``A ∈ R^{K×h×w}`` the activations of a layer and
``y_c`` the logit of class ``c``,

    α_k = (1 / hw) Σ_ij ∂y_c / ∂A_kij          (the spatial mean of the gradient)
    L_c = ReLU(Σ_k α_k A_k)

Shared by the analysis (:mod:`moekit.analysis.gradcam`) and CAM-guided training
(:mod:`moekit.losses.cam_guided`). The layer (:func:`find_cam_layer`) is, unless named: the
last stage of the model's timm backbone (``feature_info``: ``layer4`` of a ResNet, the last
stage of a Swin; for a ViT pooled by its class token the *input* of the last block, its
``norm1``, since the last block's patch tokens no longer reach the class token), else the last
``Conv2d``. Transformer tokens are put back on their patch grid (:func:`to_grid`): ViT's
``[B, N, C]`` tokens without the class (prefix) tokens, Swin's channels-last maps permuted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from moekit.errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class CamLayer:
    """The layer maps are taken at: its module path, the module, and how its output is laid
    out (``NCHW`` maps, ``NHWC`` maps; a 3-d output is tokens ``[B, N, C]`` whose first
    ``prefix`` tokens are not on the grid)."""

    name: str
    module: nn.Module
    layout: str
    prefix: int = 0


def _owner_attribute(model: nn.Module, name: str, attribute: str) -> Any:
    """``attribute`` of the closest module at or above ``name`` that has it (None if none)."""
    modules = dict(model.named_modules())
    parts = name.split(".")
    for end in range(len(parts), -1, -1):
        owner = modules.get(".".join(parts[:end]))
        if owner is not None and hasattr(owner, attribute):
            return getattr(owner, attribute)
    return None


def _timm_model(modules: dict[str, nn.Module]) -> tuple[str, nn.Module] | None:
    """The timm model of the backbone (``backbone`` or ``backbone.body``) and its path."""
    for path in ("backbone", "backbone.body", "backbone.model"):
        module = modules.get(path)
        if module is not None and hasattr(module, "feature_info"):
            return path, module
    return None


def find_cam_layer(model: nn.Module, layer: str | None = None) -> CamLayer:
    """The layer of the maps: ``layer`` (a module path of ``model``) or the default (see the
    module docstring). A path that names no module is a one-line error with the closest names.
    """
    modules = dict(model.named_modules())
    if layer is None:
        found = _timm_model(modules)
        if found is not None:
            path, timm_model = found
            last = timm_model.feature_info[-1]["module"]
            candidates = [f"{path}.{last}", f"{path}.{last.replace('.', '_')}"]
            if getattr(timm_model, "global_pool", None) == "token":  # pooled: the class token
                candidates.insert(0, f"{path}.{last}.norm1")
            layer = next((c for c in candidates if c in modules), None)
        if layer is None:
            convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
            if not convs:
                raise ConfigError(
                    f"{type(model).__name__} has no timm backbone and no Conv2d: name the layer "
                    "of the class-activation maps"
                )
            layer = convs[-1]
    if layer not in modules:
        raise ConfigError(
            f"layer: the model has no module '{layer}'{did_you_mean(layer, list(modules))}"
        )
    fmt = _owner_attribute(model, layer, "output_fmt")
    layout = "NHWC" if str(fmt) in ("NHWC", "Format.NHWC") else "NCHW"
    prefix = _owner_attribute(model, layer, "num_prefix_tokens") or 0
    return CamLayer(layer, modules[layer], layout, int(prefix))


def to_grid(activation: Tensor, layer: CamLayer, image_size: Sequence[int]) -> Tensor:
    """A layer's output (or its gradient) as maps ``[B, C, h, w]``: NCHW as is, NHWC permuted,
    tokens without their prefix tokens on the grid whose aspect ratio is the image's."""
    if activation.dim() == 4:
        return activation.permute(0, 3, 1, 2) if layer.layout == "NHWC" else activation
    if activation.dim() != 3:
        raise ValueError(
            f"class-activation map: layer '{layer.name}' gives a {activation.dim()}-d output "
            f"{tuple(activation.shape)}; expected maps [B, C, h, w] or tokens [B, N, C]"
        )
    tokens = activation[:, layer.prefix :]
    count = tokens.shape[1]
    height, width = image_size
    rows = max(1, round(math.sqrt(count * height / width)))
    if count % rows:
        raise ValueError(
            f"class-activation map: {count} tokens of layer '{layer.name}' do not form a grid "
            f"of the image's aspect ratio {height}x{width}"
        )
    grid = tokens.reshape(tokens.shape[0], rows, count // rows, tokens.shape[2])
    return grid.permute(0, 3, 1, 2)


def weighted_map(activation: Tensor, gradient: Tensor) -> Tensor:
    """``Σ_k α_k A_k`` with ``α_k`` the spatial mean of the gradient, before the ReLU:
    ``[B, h, w]`` from maps ``[B, K, h, w]``."""
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    return (weights * activation).sum(dim=1)
