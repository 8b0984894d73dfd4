"""A tiny two-task CNN for tests, docs and smoke runs (``tiny_mtl``).

A shared trunk of two convolutions (the second with stride 2) and one head per task:
image-level tasks pool the features and apply a linear layer, dense tasks apply two
convolutions and upsample to the input size. No normalisation statistics and no dropout, so
data-parallel training on ``P`` processes matches one process with the same global batch.

A head only runs on the rows its task mask selects; a task without any selected row leaves its
head unused in that step (as IDRiD's grading images leave the segmentation heads unused), which
exercises the trainer's handling of unused parameters under DDP.

With ``moe: {num_experts: E, router: {...}}`` an MoE block (:class:`moekit.moe.MoEModules`)
sits between the trunk and the heads: ``E`` small convolutional experts shared by all tasks,
routed per (image, task) row with one gate per task (Mod-Squad style), so the model reports
routing records for the routing losses and phase schedules.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.errors import ConfigError
from moekit.models.heads import scatter_rows
from moekit.models.single_task import task_position
from moekit.moe import keep_task_routers
from moekit.registry import MODELS
from moekit.types import ModelOutput, Task


def _head(task: Task, channels: int) -> nn.Module:
    if task.is_dense:
        return nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, task.num_classes, 1),
        )
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, task.num_classes)
    )


@MODELS.register("tiny_mtl")
class TinyMTL(nn.Module):
    """Shared two-layer conv trunk (``backbone``) and one small head per task (``heads``).

    Args:
        tasks: the experiment's tasks (any kinds; dense tasks get convolutional heads).
        in_channels: image channels.
        width: channels of the first convolution (the second has ``2 * width``).
        moe: optional MoE block ``{num_experts: E, router: {type: ...}}`` before the heads.
    """

    def __init__(
        self,
        tasks: Mapping[str, Task],
        in_channels: int = 3,
        width: int = 8,
        moe: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        channels = 2 * width
        self.backbone = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, channels, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.moe = None if moe is None else _moe_block(moe, channels, len(tasks))
        self.heads = nn.ModuleDict({name: _head(task, channels) for name, task in tasks.items()})
        if self.moe is not None:
            from moekit.moe import name_moe_layers

            name_moe_layers(self)
        self.out_shapes = {
            name: (task.num_classes, None) if task.is_dense else (task.num_classes,)
            for name, task in tasks.items()
        }

    def single_task(self, task: str) -> None:
        """Keep only ``task``: its head and its gate in the MoE block (per-task extraction)."""
        t = task_position(list(self.heads), task)
        keep_task_routers(self, t)
        self.heads = nn.ModuleDict({task: self.heads[task]})
        self.out_shapes = {task: self.out_shapes[task]}

    def forward(self, inputs: Tensor, task_mask: Mapping[str, Tensor] | None = None) -> ModelOutput:
        batch = inputs.shape[0]
        features = self.backbone(inputs)
        rows = {}
        for name in self.heads:
            mask = None if task_mask is None or name not in task_mask else task_mask[name]
            rows[name] = (
                torch.arange(batch, device=inputs.device)
                if mask is None
                else (mask.to(inputs.device).nonzero().flatten())
            )
        task_features, routing = self._task_features(features, rows)
        preds = {}
        for name, head in self.heads.items():
            if rows[name].numel() == 0:
                preds[name] = features.new_zeros((batch, *self._shape(name, inputs)))
                continue
            out = self._run(name, head, task_features[name], inputs)
            preds[name] = (
                out if rows[name].numel() == batch else scatter_rows(out, rows[name], batch)
            )
        return ModelOutput(preds, routing)

    def _task_features(
        self, features: Tensor, rows: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], list]:
        """Per-task feature rows; through the MoE block (one row per image and task) if any."""
        if self.moe is None:
            return {name: features[index] for name, index in rows.items()}, []
        index = torch.cat(list(rows.values()))
        task_ids = torch.cat([torch.full_like(r, i) for i, r in enumerate(rows.values())])
        mixed, record = self.moe(features[index], task_ids)
        parts = mixed.split([r.numel() for r in rows.values()])
        return dict(zip(rows, parts)), [record]

    def _shape(self, name: str, inputs: Tensor) -> tuple[int, ...]:
        shape = self.out_shapes[name]
        return (shape[0], *inputs.shape[-2:]) if len(shape) == 2 else shape

    def _run(self, name: str, head: nn.Module, features: Tensor, inputs: Tensor) -> Tensor:
        out = head(features)
        if len(self.out_shapes[name]) == 2:
            out = F.interpolate(out, size=inputs.shape[-2:], mode="bilinear", align_corners=False)
        return out


def _moe_block(cfg: Mapping[str, Any], channels: int, num_tasks: int) -> nn.Module:
    """An :class:`moekit.moe.MoEModules` of small conv experts with one gate per task."""
    from moekit.moe import MoEModules

    options = dict(cfg)
    count = int(options.pop("num_experts", 3))
    router = options.pop("router", {"type": "softmax"})
    if options:
        raise ConfigError(
            f"model.moe: unknown key '{sorted(options)[0]}'; valid: num_experts, router"
        )
    experts = [
        nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU()) for _ in range(count)
    ]
    return MoEModules(experts, router=router, num_tasks=num_tasks, dim=channels)
