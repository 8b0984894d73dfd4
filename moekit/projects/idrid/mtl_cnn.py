"""The IDRiD multi-task MoE model: a ResNet backbone with per-task MoE heads.

Roy, "Mixture-of-Experts, Multi-Task Learning for Eye Disease Diagnosis", 2025 (IDRiD). One
model grades diabetic retinopathy (``rg``) and macular-edema risk (``mer``) and segments five
lesions from a fundus photograph:

- backbone: a timm CNN, stage-1 low-level features (stride 4) and dilated stage-4 features
  (output stride 16);
- classification task: :class:`~moekit.moe.MoEModules` over DSConv classifier experts on the
  stage-4 features, routed by that task's own gate;
- segmentation: one shared ASPP on the stage-4 features, then per lesion an
  :class:`~moekit.moe.MoEModules` over DeepLabV3+ decoder experts (DSConv), whose combined
  logits are upsampled once to the input size.

The experts are ``EXPERTS`` entries chosen in the config (``cls_expert: {type: dsconv_cls,
...}``, ``seg_expert: {type: deeplab_decoder, ...}``, the IDRiD paper's by default); the model
passes each its input channels and the task's classes. Every task's gate sees the globally
pooled stage-4 backbone features, as in the IDRiD paper. With ``score: sigmoid`` every
expert gets an independent score, as in the paper; the dense phase mixes all experts with
``scores / Σ scores`` and the top-p phase keeps the highest scores until their sum reaches
``p`` (``renormalize: true``). Unlike the reference code, unselected experts are never
computed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from moekit.errors import ConfigError
from moekit.models.heads import scatter_rows
from moekit.models.single_task import task_position
from moekit.moe import MoEModules, name_moe_layers
from moekit.nn.aspp import ASPP
from moekit.registry import BACKBONES, EXPERTS, MODELS, accepted_kwargs
from moekit.routing.types import RoutingRecord
from moekit.types import ModelOutput, Task

DEFAULT_ROUTER = {"type": "softmax", "score": "sigmoid", "renormalize": True}


@MODELS.register("mtl_cnn")
class MultiTaskCNN(nn.Module):
    """IDRiD multi-task MoE CNN: ResNet backbone, per-task MoE classification and
    DeepLabV3+ segmentation heads (Roy 2025; Chen et al. 2018 for DeepLabV3+).

    ``channels_last: true`` stores the convolution weights in channels-last (NHWC) layout, so
    the convolutions also produce channels-last activations (the same function; faster oneDNN
    kernels on a CPU in bf16, measured in docs/performance.md).
    """

    def __init__(
        self,
        tasks: Mapping[str, Task],
        backbone: Mapping[str, Any] | None = None,
        num_experts: int = 3,
        router: Mapping[str, Any] | None = None,
        cls_expert: Mapping[str, Any] | None = None,
        seg_expert: Mapping[str, Any] | None = None,
        aspp: Mapping[str, Any] | None = None,
        run_all_heads: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.task_names = list(tasks)
        self.dense_tasks = {name for name, task in tasks.items() if task.is_dense}
        self.run_all_heads = run_all_heads
        spec = {"type": "timm_features", "output_stride": 16, **(backbone or {})}
        self.backbone = BACKBONES.build(spec)
        low_channels, high_channels = self.backbone.channels[0], self.backbone.channels[-1]
        router = dict(router or DEFAULT_ROUTER)
        heads: dict[str, nn.Module] = {}
        seg_spec = {"type": "deeplab_decoder", **(seg_expert or {})}
        cls_spec = {"type": "dsconv_cls", **(cls_expert or {})}
        for name, task in tasks.items():
            if task.is_dense:
                if task.kind != "segmentation":
                    raise ConfigError(f"tasks.{name}: mtl_cnn segments; got kind '{task.kind}'")
                experts = [
                    EXPERTS.build(
                        seg_spec,
                        num_classes=task.num_classes,
                        high_channels=(aspp or {}).get("out_channels", 256),
                        low_channels=low_channels,
                    )
                    for _ in range(num_experts)
                ]
            else:
                defaults = {"num_classes": task.num_classes, "in_channels": high_channels}
                if "mid_channels" in accepted_kwargs(EXPERTS.get(cls_spec["type"]))[0]:
                    defaults["mid_channels"] = high_channels // 2
                experts = [EXPERTS.build(cls_spec, **defaults) for _ in range(num_experts)]
            heads[name] = MoEModules(experts, router=router, dim=high_channels)
        self.num_classes = {name: task.num_classes for name, task in tasks.items()}
        self.heads = nn.ModuleDict(heads)
        self.aspp = ASPP(in_channels=high_channels, **(aspp or {})) if self.dense_tasks else None
        name_moe_layers(self)
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def single_task(self, task: str) -> None:
        """Keep only ``task``'s MoE head (and the ASPP if ``task`` segments): every head has
        its own gate, so nothing else changes (per-task extraction)."""
        task_position(self.task_names, task)
        self.heads = nn.ModuleDict({task: self.heads[task]})
        self.task_names = [task]
        self.dense_tasks &= {task}
        if not self.dense_tasks:
            self.aspp = None

    def _rows(self, name: str, task_mask: Mapping[str, Tensor] | None, batch: int, device):
        if task_mask is None or self.run_all_heads:
            return torch.arange(batch, device=device)
        mask = task_mask.get(name)
        if mask is None:
            return torch.zeros(0, dtype=torch.long, device=device)
        return mask.to(device).nonzero().squeeze(1)

    def forward(self, inputs: Tensor, task_mask: Mapping[str, Tensor] | None = None) -> ModelOutput:
        batch, size = inputs.shape[0], inputs.shape[-2:]
        low, high = self.backbone(inputs)
        rows = {name: self._rows(name, task_mask, batch, inputs.device) for name in self.task_names}
        aspp = None
        seg_rows = [rows[n] for n in self.dense_tasks if rows[n].numel()]
        if seg_rows:
            need = torch.unique(torch.cat(seg_rows))
            aspp_out = self.aspp(high[need])
            aspp = high.new_zeros((batch, *aspp_out.shape[1:])).index_put((need,), aspp_out)
        preds: dict[str, Tensor] = {}
        records: list[RoutingRecord] = []
        for name in self.task_names:
            idx = rows[name]
            head = self.heads[name]
            if name in self.dense_tasks:
                if idx.numel() == 0:
                    preds[name] = inputs.new_zeros((batch, self.num_classes[name], *size))
                    continue
                logits, record = head((aspp[idx], low[idx]), gate_input=high[idx])
                out = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            else:
                if idx.numel() == 0:
                    preds[name] = inputs.new_zeros((batch, self.num_classes[name]))
                    continue
                out, record = head(high[idx])
            records.append(record)
            preds[name] = scatter_rows(out, idx, batch)
        return ModelOutput(preds, records)
