"""What M4oE and its baselines share: one token encoder per modality, a head per task, the
missing-modality mask and the (sample, task) rows.

Each model encodes every modality a sample has (an absent modality's tensor is never read),
fuses the encodings its own way into one feature ``f [R, C_f]`` per (sample, task) row, and
hands the rows to the task heads (:mod:`moekit.projects.m4oe.heads`). A model with a single
modality also takes that modality's tensor itself as ``inputs`` (what a single-modality
dataset serves).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from moekit.errors import ConfigError, did_you_mean
from moekit.models.heads import scatter_rows
from moekit.projects.m4oe.heads import HEAD_TYPES, FiLMDecoderHead
from moekit.registry import BACKBONES, accepted_kwargs
from moekit.types import Task

HEAD_FILLED = ("dim", "out_channels", "fused_dim")


def task_rows(
    task_names: Sequence[str], task_mask: Mapping[str, Tensor] | None, batch: int, device: Any
) -> tuple[Tensor, Tensor]:
    """``(sample [R], task_ids [R])``: every sample once per task it is labelled for (every
    task when ``task_mask`` is None), task-major."""
    samples, task_ids = [], []
    for t, name in enumerate(task_names):
        if task_mask is None:
            idx = torch.arange(batch, device=device)
        elif name in task_mask:
            idx = task_mask[name].to(device).nonzero().squeeze(1)
        else:
            continue
        samples.append(idx)
        task_ids.append(torch.full_like(idx, t))
    if not samples:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty
    return torch.cat(samples), torch.cat(task_ids)


def used_modalities(modalities: Any) -> dict[str, Mapping[str, Any]]:
    """The modalities a model reads: ``model.modalities`` without the ``null`` entries (a
    modality the data carries and the model ignores, e.g. a single-modality baseline)."""
    if not isinstance(modalities, Mapping) or not modalities:
        raise ConfigError("config key 'model.modalities': expected {name: encoder config}")
    used = {name: cfg for name, cfg in modalities.items() if cfg is not None}
    if not used:
        raise ConfigError("config key 'model.modalities': every encoder is null; keep one")
    return used


@dataclass
class Encoded:
    """One modality's encoder output for the samples that have it."""

    samples: Tensor
    tokens: Tensor
    grid: tuple[int, int] | None


class MultiModalTaskModel(nn.Module):
    """Token encoders (``modalities: {name: BACKBONES config}``, built with ``dim``) and one
    head per task (``heads``, see :meth:`build_head`); subclasses fuse.

    ``fused_dim`` is the width of the fused feature the heads read (``dim`` unless a subclass
    concatenates).
    """

    def __init__(
        self,
        tasks: Mapping[str, Task],
        modalities: Mapping[str, Mapping[str, Any]],
        dim: int,
        heads: Mapping[str, Any] | None = None,
        fused_dim: int | None = None,
    ) -> None:
        super().__init__()
        used = used_modalities(modalities)
        self.task_names = list(tasks)
        self.modality_names = list(used)
        self.encoders = nn.ModuleDict(
            {name: BACKBONES.build(cfg, dim=dim) for name, cfg in used.items()}
        )
        heads = dict(heads or {})
        unknown = sorted(set(heads) - set(self.task_names))
        if unknown:
            raise ConfigError(f"config key 'model.heads': no task named '{unknown[0]}'")
        self.heads = nn.ModuleDict(
            {
                name: self.build_head(name, task, dim, fused_dim or dim, heads.get(name))
                for name, task in tasks.items()
            }
        )

    def build_head(
        self, name: str, task: Task, dim: int, fused_dim: int, cfg: Mapping[str, Any] | None
    ) -> nn.Module:
        """Task ``name``'s head from ``model.heads.<name>``: ``{type: linear, dropout}`` (the
        default for classification and regression) or ``{type: film_decoder, modality,
        hidden}`` (the default for segmentation; ``modality`` defaults to the first one with a
        2-D token map)."""
        cfg = dict(cfg or {})
        kind = cfg.pop("type", "film_decoder" if task.is_dense else "linear")
        where = f"config key 'model.heads.{name}"
        if kind not in HEAD_TYPES:
            raise ConfigError(
                f"{where}.type': '{kind}' is unknown; valid: {', '.join(HEAD_TYPES)}"
                f"{did_you_mean(str(kind), HEAD_TYPES)}"
            )
        accepted = [k for k in accepted_kwargs(HEAD_TYPES[kind])[0] if k not in HEAD_FILLED]
        for key in cfg:
            if key not in accepted:
                raise ConfigError(
                    f"{where}.{key}': head '{kind}' does not accept it; accepted: "
                    f"{', '.join(accepted)}{did_you_mean(str(key), accepted)}"
                )
        if kind == "film_decoder":
            spatial = [m for m in self.modality_names if getattr(self.encoders[m], "spatial", 0)]
            modality = cfg.setdefault("modality", spatial[0] if spatial else None)
            if modality not in spatial:
                raise ConfigError(
                    f"{where}.modality': '{modality}' is not a modality with a 2-D feature "
                    f"map; valid: {', '.join(spatial) or '(none)'}"
                )
            return FiLMDecoderHead(dim, task.num_classes, fused_dim=fused_dim, **cfg)
        return HEAD_TYPES[kind](dim=fused_dim, out_channels=task.num_classes, **cfg)

    def keep_task_head(self, task: str) -> int:
        """Keep only ``task``'s head and name it the model's only task; returns its old id."""
        from moekit.models.single_task import task_position

        t = task_position(self.task_names, task)
        self.heads = nn.ModuleDict({task: self.heads[task]})
        self.task_names = [task]
        return t

    def presence(
        self, inputs: Mapping[str, Tensor] | Tensor, present: Tensor | None
    ) -> tuple[dict[str, Tensor], Tensor]:
        """``(the model's modalities of inputs as {modality: tensor}, present as bool [B, M]
        in the model's modality order)``; ``present`` None means every modality is there.
        Inputs of modalities the model does not read are left out (never read)."""
        if isinstance(inputs, Tensor) and len(self.modality_names) == 1:
            inputs = {self.modality_names[0]: inputs}
        if not isinstance(inputs, Mapping):
            raise TypeError(
                f"{type(self).__name__} expects inputs {{modality: tensor}}, got "
                f"{type(inputs).__name__}"
            )
        missing = [m for m in self.modality_names if m not in inputs]
        if missing:
            raise ValueError(
                f"{type(self).__name__}: inputs have modalities {list(inputs)}; the model reads "
                f"{self.modality_names}"
            )
        first = inputs[self.modality_names[0]]
        own = {m: inputs[m] for m in self.modality_names}
        if present is None:
            mask = torch.ones(
                first.shape[0], len(self.modality_names), dtype=torch.bool, device=first.device
            )
            return own, mask
        order = list(inputs)
        columns = [order.index(m) for m in self.modality_names]
        if present.shape != (first.shape[0], len(order)):
            raise ValueError(
                f"{type(self).__name__}: present has shape {tuple(present.shape)}; expected "
                f"[{first.shape[0]}, {len(order)}] (samples, modalities)"
            )
        return own, present.to(device=first.device, dtype=torch.bool)[:, columns]

    def encode(self, inputs: Mapping[str, Tensor], present: Tensor) -> dict[str, Encoded]:
        """Each modality's encoder on the samples that have it (modalities no sample has are
        left out)."""
        encoded = {}
        for i, name in enumerate(self.modality_names):
            samples = present[:, i].nonzero().squeeze(1)
            if samples.numel() == 0:
                continue
            x = inputs[name]
            if samples.numel() != x.shape[0]:
                x = x.index_select(0, samples)
            tokens, grid = self.encoders[name](x)
            encoded[name] = Encoded(samples, tokens, grid)
        return encoded

    def predict_all(
        self,
        fused: Tensor,
        rows: Tensor,
        task_ids: Tensor,
        inputs: Mapping[str, Tensor],
        encoded: dict[str, Encoded],
        present: Tensor,
    ) -> dict[str, Tensor]:
        """Every task's predictions (``B`` rows each) from the fused features of its rows."""
        return {
            name: self.predict(name, fused, rows, task_ids == t, inputs, encoded, present)
            for t, name in enumerate(self.task_names)
        }

    def predict(
        self,
        name: str,
        fused: Tensor,
        rows: Tensor,
        of_task: Tensor,
        inputs: Mapping[str, Tensor],
        encoded: dict[str, Encoded],
        present: Tensor,
    ) -> Tensor:
        """Task ``name``'s predictions for all ``B`` samples from the fused features of its
        rows (zero rows where not computed; a segmentation only where its modality is
        present)."""
        head, batch = self.heads[name], present.shape[0]
        size = None
        if isinstance(head, FiLMDecoderHead):
            size = tuple(inputs[head.modality].shape[-2:])
            of_task = of_task & present[rows, self.modality_names.index(head.modality)]
        selected = of_task.nonzero().squeeze(1)
        if selected.numel() == 0:
            return fused.new_zeros((batch, *head.output_shape(size)))
        samples = rows.index_select(0, selected)
        features = fused.index_select(0, selected)
        if size is None:
            return scatter_rows(head(features), samples, batch)
        enc = encoded[head.modality]
        if enc.grid is None:
            raise ValueError(
                f"{type(self).__name__}: the encoder of '{head.modality}' gave no 2-D token grid"
            )
        position = torch.full((batch,), -1, dtype=torch.long, device=rows.device)
        position[enc.samples] = torch.arange(enc.samples.numel(), device=rows.device)
        tokens = enc.tokens.index_select(0, position[samples])
        feature_map = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *enc.grid)
        return scatter_rows(head(features, feature_map, size), samples, batch)
