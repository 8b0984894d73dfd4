"""M4oE's baselines on the same encoders and heads: late fusion and an MMoE-style fusion.

Both pool each present modality's tokens, ``p_m = LN_m(mean(X_m)) [C]`` (0 for an absent
modality, whose tensor is never read), and concatenate them, ``z = [p_1, …, p_M] [M·C]``:

* ``late_fusion`` — one head per task on ``z`` (M4oE's "natural multi-task" row: the
  modalities are fused by a fixed linear map per task). With one modality it is a plain
  single-modality model: encoder, pooling, head.
* ``mmoe_fusion`` — Multi-gate Mixture-of-Experts (Ma et al., "Modeling Task Relationships in
  Multi-task Learning with Multi-gate Mixture-of-Experts", KDD 2018) on ``z``: a shared linear
  map ``x = W z [C]``, ``E`` expert MLPs and one gate per task, ``f_t = LN(Σ_e g_{t,e}(x)
  MLP_e(x))`` (an ``MOE_LAYERS`` layer with per-task gates, dense softmax routing by
  default); the heads read ``f_t``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from moekit.errors import ConfigError
from moekit.models.heads import scatter_rows
from moekit.moe import keep_task_routers, name_moe_layers
from moekit.projects.m4oe.base import (
    Encoded,
    MultiModalTaskModel,
    task_rows,
    used_modalities,
)
from moekit.registry import MODELS, MOE_LAYERS
from moekit.types import ModelOutput, Task

MMOE_DEFAULT: dict[str, Any] = {
    "type": "moe_mlp",
    "num_experts": 4,
    "router": {"type": "softmax"},
}


class PooledConcat(MultiModalTaskModel):
    """Encoders, ``z = [LN_m(mean(X_m))]_m [M·C]`` (0 where absent), heads."""

    def __init__(
        self,
        tasks: Mapping[str, Task],
        modalities: Mapping[str, Mapping[str, Any]],
        dim: int,
        heads: Mapping[str, Any] | None,
        fused_dim: int | None = None,
    ) -> None:
        super().__init__(tasks, modalities, dim, heads, fused_dim)
        self.pool_norm = nn.ModuleDict({m: nn.LayerNorm(dim) for m in self.modality_names})

    def concat(self, encoded: dict[str, Encoded], batch: int, dim: int) -> Tensor:
        """``z [B, M·C]``: each present modality's normed mean token, zeros where absent."""
        parts = []
        for name in self.modality_names:
            if name in encoded:
                pooled = self.pool_norm[name](encoded[name].tokens.mean(dim=1))
                parts.append(scatter_rows(pooled, encoded[name].samples, batch))
            else:
                parts.append(self.pool_norm[name].weight.new_zeros(batch, dim))
        return torch.cat(parts, dim=1)

    def fuse(self, z: Tensor, task_ids: Tensor) -> tuple[Tensor, list]:
        """Fused features ``[R, C_f]`` of the (sample, task) rows of ``z [R, M·C]``."""
        return z, []

    def forward(
        self,
        inputs: Mapping[str, Tensor] | Tensor,
        task_mask: Mapping[str, Tensor] | None = None,
        present: Tensor | None = None,
    ) -> ModelOutput:
        inputs, present = self.presence(inputs, present)
        batch = present.shape[0]
        rows, task_ids = task_rows(self.task_names, task_mask, batch, present.device)
        encoded = self.encode(inputs, present)
        dim = next(iter(self.pool_norm.values())).normalized_shape[0]
        z = self.concat(encoded, batch, dim).index_select(0, rows)
        fused, records = self.fuse(z, task_ids)
        return ModelOutput(
            self.predict_all(fused, rows, task_ids, inputs, encoded, present), records
        )


@MODELS.register("late_fusion")
class LateFusion(PooledConcat):
    """Late fusion: one head per task on the concatenated pooled modality features (module
    docstring).

    Args:
        tasks: the experiment's tasks.
        modalities: ``{name: token encoder config}`` (``BACKBONES``; ``dim`` is filled in).
        dim: token width ``C``; the heads read ``M·C``.
        heads: as :class:`~moekit.projects.m4oe.m4oe_model.M4oE`'s (a segmentation head
            decodes its modality's token map, FiLM-conditioned on ``z``).
    """

    def __init__(
        self,
        tasks: Mapping[str, Task],
        modalities: Mapping[str, Mapping[str, Any]],
        dim: int = 384,
        heads: Mapping[str, Any] | None = None,
    ) -> None:
        width = dim * len(used_modalities(modalities))
        super().__init__(tasks, modalities, dim, heads, fused_dim=width)

    def single_task(self, task: str) -> None:
        """Keep only ``task``'s head (per-task extraction)."""
        self.keep_task_head(task)


@MODELS.register("mmoe_fusion")
class MMoEFusion(PooledConcat):
    """MMoE fusion: per-task gates over shared experts on the concatenated pooled modality
    features (module docstring).

    Args:
        tasks: the experiment's tasks.
        modalities: ``{name: token encoder config}`` (``BACKBONES``; ``dim`` is filled in).
        dim: token width ``C``.
        moe: the ``MOE_LAYERS`` config of the experts and gates (built with ``num_tasks =
            T``); default ``{type: moe_mlp, num_experts: 4, router: {type: softmax}}``,
            ``hidden`` default ``2·C``.
        heads: as :class:`~moekit.projects.m4oe.m4oe_model.M4oE`'s.
    """

    def __init__(
        self,
        tasks: Mapping[str, Task],
        modalities: Mapping[str, Mapping[str, Any]],
        dim: int = 384,
        moe: Mapping[str, Any] | None = None,
        heads: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(tasks, modalities, dim, heads)
        cfg = dict(MMOE_DEFAULT if moe is None else moe)
        if "type" not in cfg:
            raise ConfigError(f"config key 'model.moe': expected a 'type' key, got {moe!r}")
        cfg.setdefault("hidden", 2 * dim)
        self.shared = nn.Linear(dim * len(self.modality_names), dim)
        self.experts = MOE_LAYERS.build(cfg, dim=dim, num_tasks=len(self.task_names))
        self.norm = nn.LayerNorm(dim)
        name_moe_layers(self)

    def fuse(self, z: Tensor, task_ids: Tensor) -> tuple[Tensor, list]:
        """``f_t = LN(MoE_t(W z))`` for every (sample, task) row."""
        y, record = self.experts(self.shared(z), task_ids)
        return self.norm(y), [record]

    def single_task(self, task: str) -> None:
        """Keep only ``task``'s head and gate (per-task extraction)."""
        keep_task_routers(self, self.keep_task_head(task))
