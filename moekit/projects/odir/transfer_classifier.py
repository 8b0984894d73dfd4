"""``transfer_classifier``: an image classifier on any timm backbone (the ODIR study's model).

The ODIR study (transfer learning for multi-label DR / glaucoma / AMD classification) puts a
small head on a pretrained ResNet-18 or EfficientNet-B0 (and ViT-B/16, Swin-S):

    backbone.forward_features -> [attention] -> backbone's own pooling -> head -> logits

- **backbone**: any timm model by ``name``, its classifier removed (``num_classes=0``); the
  pooling is the model's own (global average for CNNs and Swin, the class token for ViT), so
  the head sees exactly the features the model's classifier would;
- **attention** (optional) on the last feature map or token set before pooling, for CNN maps
  and transformer tokens alike (a map's ``H·W`` positions are its tokens): ``se`` —
  Squeeze-and-Excitation (Hu et al. 2018) — or ``mhsa`` — multi-head self-attention,
  pre-LayerNorm, 8 heads, residual;
- **classifier** per task: ``mlp`` — the study's ``Linear(F, 512) → ReLU → Dropout 0.5 →
  Linear(512, C)`` —, ``linear``, or ``moe`` — beyond the study: ``E`` expert heads and one
  gate per *label* (the labels as the tasks of an MoE layer, Mod-Squad-style per-task gates),
  ``logit_c = Σ_e w_{c,e}(x) · expert_e(x)_c``, so routing can specialise experts on rare
  labels.

Inputs are images ``[B, 3, H, W]``, or several views of one sample (``{"left": ...,
"right": ...}`` with ``present [B, M]``): each view runs through the backbone and the pooled
features of the present views are averaged before the heads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import timm
import torch
from timm.layers import Format
from torch import Tensor, nn

from moekit.errors import ConfigError, did_you_mean
from moekit.models.backbones import check_timm_name, pretrained_kwargs
from moekit.models.heads import scatter_rows
from moekit.models.single_task import task_position
from moekit.moe import MoEModules, name_moe_layers
from moekit.nn.attention_pool import TokenSelfAttention
from moekit.nn.se import TokenSqueezeExcitation
from moekit.registry import MODELS
from moekit.routing.types import RoutingRecord
from moekit.types import ModelOutput, Task

ATTENTION_TYPES = ("se", "mhsa")
CLASSIFIER_TYPES = ("mlp", "linear", "moe")
BACKBONE_KEYS = ("name", "pretrained", "timm_kwargs")
STUDY_HEAD = {"type": "mlp", "hidden": 512, "dropout": 0.5}
"""The ODIR study's classifier: ``Linear(F, 512) → ReLU → Dropout 0.5 → Linear(512, C)``."""


def _spec(value: str | Mapping[str, Any], where: str, choices: tuple[str, ...]) -> dict[str, Any]:
    """``name`` or ``{type: name, **options}`` with ``name`` among ``choices``, as a dict."""
    spec = {"type": value} if isinstance(value, str) else dict(value)
    kind = spec.get("type")
    if kind not in choices:
        raise ConfigError(
            f"config key '{where}': '{kind}' is not one of {', '.join(choices)}"
            f"{did_you_mean(str(kind), choices)}"
        )
    return spec


def _check_keys(spec: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(spec) - {"type", *allowed})
    if unknown:
        raise ConfigError(
            f"config key '{where}.{unknown[0]}': unknown; valid: {', '.join(allowed) or 'none'}"
        )


def build_attention(spec: str | Mapping[str, Any] | None, channels: int) -> nn.Module:
    """``None`` (identity), ``se`` ``{reduction: 16}`` or ``mhsa`` ``{num_heads: 8, dropout}``,
    acting on tokens ``[B, N, C]``."""
    if spec is None:
        return nn.Identity()
    options = _spec(spec, "model.attention", ATTENTION_TYPES)
    kind = options.pop("type")
    if kind == "se":
        _check_keys(options, ("reduction",), "model.attention")
        return TokenSqueezeExcitation(channels, **options)
    _check_keys(options, ("num_heads", "dropout"), "model.attention")
    return TokenSelfAttention(channels, **options)


def build_head(spec: Mapping[str, Any], dim: int, num_classes: int, where: str) -> nn.Module:
    """A plain head ``[B, dim] -> [B, num_classes]``: ``mlp {hidden, dropout}`` or ``linear``."""
    options = dict(spec)
    kind = options.pop("type")
    if kind == "linear":
        _check_keys(options, (), where)
        return nn.Linear(dim, num_classes)
    if kind != "mlp":
        raise ConfigError(f"config key '{where}': '{kind}' is not one of mlp, linear")
    _check_keys(options, ("hidden", "dropout"), where)
    hidden = int(options.get("hidden", STUDY_HEAD["hidden"]))
    return nn.Sequential(
        nn.Linear(dim, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(float(options.get("dropout", STUDY_HEAD["dropout"]))),
        nn.Linear(hidden, num_classes),
    )


class LabelRoutedHead(nn.Module):
    """Expert heads mixed per label: ``logit_c(x) = Σ_e w_{c,e}(x) · expert_e(x)_c``.

    Each of the ``C`` labels is a task of one :class:`~moekit.moe.MoEModules` layer with its own
    gate ``w_c`` over ``E`` expert heads (each ``[B, F] -> [B, C]``), so a label's routing is
    learned from that label's loss alone and recorded per label (``task_ids`` = label index):
    usage statistics show which experts each label uses. Every (sample, label) pair is one
    routed row; the experts run once per selected row.

    Args:
        dim: pooled feature width ``F``.
        num_classes: ``C`` labels.
        num_experts: ``E``.
        expert_head: each expert (``mlp`` or ``linear``, see :func:`build_head`).
        router: the router config (default: dense softmax over the experts).
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        num_experts: int = 4,
        expert_head: str | Mapping[str, Any] = "mlp",
        router: Mapping[str, Any] | None = None,
        where: str = "model.classifier",
    ) -> None:
        super().__init__()
        if int(num_experts) < 1:
            raise ConfigError(f"config key '{where}.num_experts': expected >= 1, got {num_experts}")
        spec = _spec(expert_head, f"{where}.expert_head", ("mlp", "linear"))
        self.num_classes = num_classes
        self.moe = MoEModules(
            [
                build_head(spec, dim, num_classes, f"{where}.expert_head")
                for _ in range(num_experts)
            ],
            router=dict(router or {"type": "softmax"}),
            num_tasks=num_classes,
            dim=dim,
        )

    def forward(self, features: Tensor) -> tuple[Tensor, RoutingRecord]:
        batch, labels = features.shape[0], self.num_classes
        rows = features.repeat_interleave(labels, dim=0)  # row b·C + c: sample b, label c
        label_ids = torch.arange(labels, device=features.device).repeat(batch)
        mixed, record = self.moe(rows, label_ids)
        return mixed.view(batch, labels, labels).diagonal(dim1=1, dim2=2), record


@MODELS.register("transfer_classifier")
class TransferClassifier(nn.Module):
    """A timm backbone, optional attention before its pooling, and one classifier per task.

    Args:
        tasks: image-level tasks (multilabel, multiclass, regression); one classifier each.
        backbone: ``{name, pretrained, timm_kwargs}``: a timm model ``name`` (``resnet18``,
            the default, ``efficientnet_b0``, ``vit_base_patch16_224``,
            ``swin_small_patch4_window7_224``, ``convnext_tiny``...); ``pretrained`` a local
            weights file, ``true`` (timm's hub download) or ``null``; ``timm_kwargs`` further
            ``timm.create_model`` arguments (``img_size`` for ViT/Swin at another resolution,
            ``drop_path_rate``...).
        attention: ``None``, ``se`` or ``mhsa`` (a name or ``{type, **options}``).
        classifier: ``mlp`` (the study's, default; ``{type: mlp, hidden, dropout}``),
            ``linear``, or ``{type: moe, num_experts, expert_head, router}``
            (:class:`LabelRoutedHead`).
    """

    def __init__(
        self,
        tasks: Mapping[str, Task],
        backbone: Mapping[str, Any] | None = None,
        attention: str | Mapping[str, Any] | None = None,
        classifier: str | Mapping[str, Any] = "mlp",
    ) -> None:
        super().__init__()
        spec = dict(backbone or {})
        _check_keys(spec, BACKBONE_KEYS, "model.backbone")
        name = spec.get("name", "resnet18")
        check_timm_name(name, "model.backbone.name")
        for task_name, task in tasks.items():
            if task.is_dense:
                raise ConfigError(
                    f"tasks.{task_name}: transfer_classifier predicts per image; got a dense task"
                )
        self.backbone = timm.create_model(
            name,
            num_classes=0,
            **pretrained_kwargs(spec.get("pretrained"), "model.backbone.pretrained"),
            **dict(spec.get("timm_kwargs") or {}),
        )
        width = int(self.backbone.num_features)
        pooled = int(getattr(self.backbone, "head_hidden_size", width))
        self.attention = build_attention(attention, width)
        head_spec = _spec(classifier, "model.classifier", CLASSIFIER_TYPES)
        heads: dict[str, nn.Module] = {}
        for task_name, task in tasks.items():
            if head_spec["type"] == "moe":
                options = {k: v for k, v in head_spec.items() if k != "type"}
                _check_keys(options, ("num_experts", "expert_head", "router"), "model.classifier")
                heads[task_name] = LabelRoutedHead(pooled, task.num_classes, **options)
            else:
                heads[task_name] = build_head(
                    head_spec, pooled, task.num_classes, "model.classifier"
                )
        self.heads = nn.ModuleDict(heads)
        self.num_classes = {name: task.num_classes for name, task in tasks.items()}
        name_moe_layers(self)

    def single_task(self, task: str) -> None:
        """Keep only ``task``'s head (per-task extraction; the backbone is shared)."""
        task_position(list(self.heads), task)
        self.heads = nn.ModuleDict({task: self.heads[task]})
        self.num_classes = {task: self.num_classes[task]}

    def feature_map(self, images: Tensor) -> Tensor:
        """The backbone's last features after the attention block, in the backbone's own layout
        (``[B, C, H, W]`` for CNNs, ``[B, H, W, C]`` for Swin, tokens ``[B, N, C]`` for ViT):
        what the pooling sees, and the layer class-activation maps are taken at."""
        features = self.backbone.forward_features(images)
        if features.dim() == 3:
            return self.attention(features)
        channels_last = Format(getattr(self.backbone, "output_fmt", "NCHW")) == Format.NHWC
        grid = features if channels_last else features.permute(0, 2, 3, 1)
        batch, height, width, channels = grid.shape
        tokens = self.attention(grid.reshape(batch, height * width, channels))
        grid = tokens.view(batch, height, width, channels)
        return grid if channels_last else grid.permute(0, 3, 1, 2)

    def encode(self, images: Tensor) -> Tensor:
        """Pooled features ``[B, F]`` (the backbone's own pooling, before any classifier)."""
        return self.backbone.forward_head(self.feature_map(images), pre_logits=True)

    def encode_views(self, views: Mapping[str, Tensor], present: Tensor | None) -> Tensor:
        """The mean of the pooled features of each sample's present views (``[B, F]``; zeros
        for a sample without any)."""
        names = list(views)
        batch = views[names[0]].shape[0]
        if present is None:
            present = torch.ones(batch, len(names), dtype=torch.bool)
        present = present.to(views[names[0]].device)
        total: Tensor | None = None
        for m, name in enumerate(names):
            rows = present[:, m].nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            encoded = scatter_rows(self.encode(views[name][rows]), rows, batch)
            total = encoded if total is None else total + encoded
        if total is None:
            raise ValueError("encode_views: no sample of the batch has a present view")
        return total / present.sum(dim=1, keepdim=True).clamp(min=1).to(total.dtype)

    def forward(
        self,
        inputs: Tensor | Mapping[str, Tensor],
        task_mask: Mapping[str, Tensor] | None = None,
        present: Tensor | None = None,
    ) -> ModelOutput:
        if isinstance(inputs, Tensor):
            features = self.encode(inputs)
        else:
            features = self.encode_views(inputs, present)
        batch = features.shape[0]
        preds: dict[str, Tensor] = {}
        records: list[RoutingRecord] = []
        for name, head in self.heads.items():
            mask = None if task_mask is None else task_mask.get(name)
            rows = None if mask is None else mask.to(features.device).nonzero().squeeze(1)
            if rows is not None and rows.numel() == 0:
                preds[name] = features.new_zeros(batch, self.num_classes[name])
                continue
            selected = features if rows is None or rows.numel() == batch else features[rows]
            if isinstance(head, LabelRoutedHead):
                out, record = head(selected)
                records.append(record)
            else:
                out = head(selected)
            preds[name] = out if out.shape[0] == batch else scatter_rows(out, rows, batch)
        return ModelOutput(preds, records)
