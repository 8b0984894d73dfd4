"""Core types: :class:`Task` (from config), :class:`Batch` and :class:`ModelOutput`.

Every dataset yields batches whose targets are masked per task by ``has_target``; every model
returns a :class:`ModelOutput`; every loss and metric is masked by ``has_target``. This is what
lets images with different label sets (IDRiD grading vs segmentation images), missing labels and
missing modalities share one batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from moekit.errors import ConfigError, did_you_mean
from moekit.routing.types import RoutingRecord
from moekit.schema import Field, Section, anything, boolean, integer, list_of, optional, string

TaskKind = Literal["multiclass", "multilabel", "segmentation", "regression"]
TASK_KINDS: tuple[str, ...] = get_args(TaskKind)


TASK_OPTIONS = ("dense", "class_names")
"""Optional task keys kept in :attr:`Task.options`."""


def _task_section(where: str) -> Section:
    """The keys of one task spec (``tasks.<name>``)."""
    return Section(
        where,
        {
            "kind": Field(None, string, f"one of {', '.join(TASK_KINDS)}", required=True),
            "num_classes": Field(1, integer(1), "classes, labels or output channels"),
            "loss": Field([], anything, "weighted TASK_LOSSES terms"),
            "metrics": Field([], list_of(anything), "METRICS entries"),
            "dense": Field(None, optional(boolean), "per-pixel regression (segmentation is)"),
            "class_names": Field(None, optional(list_of(string)), "names of the classes"),
        },
    )


def _spec_dict(entry: Any, where: str) -> dict[str, Any]:
    """Accept ``name`` or ``{type: name, ...}`` and return the dict form."""
    if isinstance(entry, str):
        return {"type": entry}
    if isinstance(entry, Mapping) and isinstance(entry.get("type"), str):
        return dict(entry)
    raise ConfigError(
        f"config key '{where}': expected a name or a mapping with 'type', got {entry!r}"
    )


@dataclass(frozen=True)
class LossTerm:
    """One weighted term of a task loss: ``weight * TASK_LOSSES[type](**kwargs)``."""

    type: str
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)

    def config(self) -> dict[str, Any]:
        return {"type": self.type, **self.kwargs}


@dataclass(frozen=True)
class MetricSpec:
    """A metric of a task: its registry type, its column name and its direction."""

    type: str
    name: str
    higher_is_better: bool
    kwargs: dict[str, Any] = field(default_factory=dict)

    def config(self) -> dict[str, Any]:
        return {"type": self.type, **self.kwargs}


def _metric_direction(metric_type: str, where: str) -> bool:
    from moekit.registry import METRICS

    direction = getattr(METRICS.get(metric_type), "higher_is_better", None)
    if direction is None:
        raise ConfigError(
            f"{where}: metric '{metric_type}' does not declare a direction; "
            "set higher_is_better: true|false"
        )
    return bool(direction)


@dataclass(frozen=True)
class Task:
    """A task of a multi-task experiment, parsed from the ``tasks:`` section of a config.

    Example::

        tasks:
          rg:
            kind: multiclass
            num_classes: 5
            loss: [cross_entropy, {type: focal, weight: 1.0, gamma: 4.0}]
            metrics: [accuracy]
    """

    name: str
    kind: TaskKind
    num_classes: int
    loss: tuple[LossTerm, ...]
    metrics: tuple[MetricSpec, ...]
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, name: str, cfg: Mapping[str, Any]) -> Task:
        where = f"tasks.{name}"
        if not isinstance(cfg, Mapping):
            raise ConfigError(f"config key '{where}': expected a mapping, got {cfg!r}")
        spec = _task_section(where).parse(cfg)
        kind = spec["kind"]
        if kind not in TASK_KINDS:
            raise ConfigError(
                f"config key '{where}.kind': '{kind}' is not a task kind; valid: "
                f"{', '.join(TASK_KINDS)}{did_you_mean(str(kind), TASK_KINDS)}"
            )
        raw_loss = spec["loss"]
        raw_loss = [raw_loss] if isinstance(raw_loss, str | Mapping) else list(raw_loss)
        loss = []
        for i, entry in enumerate(raw_loss):
            term = _spec_dict(entry, f"{where}.loss[{i}]")
            weight = float(term.pop("weight", 1.0))
            loss.append(LossTerm(term.pop("type"), weight, term))
        metrics = []
        for i, entry in enumerate(spec["metrics"]):
            metric = _spec_dict(entry, f"{where}.metrics[{i}]")
            metric_type = metric.pop("type")
            metric_name = metric.pop("name", metric_type)
            direction = metric.pop("higher_is_better", None)
            if direction is None:
                direction = _metric_direction(metric_type, f"{where}.metrics[{i}]")
            metrics.append(MetricSpec(metric_type, metric_name, bool(direction), metric))
        options = {k: spec[k] for k in TASK_OPTIONS if spec[k] is not None}
        return cls(name, kind, spec["num_classes"], tuple(loss), tuple(metrics), options)

    def config(self) -> dict[str, Any]:
        """The task as the ``tasks.<name>`` mapping it parses from (``from_config`` reads it
        back to an equal task)."""
        return {
            "kind": self.kind,
            "num_classes": self.num_classes,
            "loss": [{"type": t.type, "weight": t.weight, **t.kwargs} for t in self.loss],
            "metrics": [
                {"type": m.type, "name": m.name, "higher_is_better": m.higher_is_better, **m.kwargs}
                for m in self.metrics
            ],
            **self.options,
        }

    @property
    def is_dense(self) -> bool:
        """Whether predictions are per pixel (segmentation and dense regression maps)."""
        return self.kind == "segmentation" or bool(self.options.get("dense", False))


def tasks_from_config(cfg: Mapping[str, Any]) -> dict[str, Task]:
    """Parse the ``tasks:`` mapping of an experiment config, in its order."""
    return parse_tasks(cfg.get("tasks"))


def parse_tasks(tasks: Any) -> dict[str, Task]:
    """``{name: Task}`` from a ``tasks:`` mapping whose values are specs or built tasks."""
    if not isinstance(tasks, Mapping) or not tasks:
        raise ConfigError("config key 'tasks': expected a non-empty mapping of task name -> spec")
    return {
        name: spec if isinstance(spec, Task) else Task.from_config(name, spec)
        for name, spec in tasks.items()
    }


def _to_device(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


@dataclass
class Batch:
    """A multi-task batch of ``B`` samples.

    Attributes:
        inputs: ``[B, C, H, W]`` images, or ``{modality: tensor}`` for multi-modal data (the
            dict's order is the modality order; shapes may differ per modality).
        targets: ``{task: tensor}`` with a row per sample (rows without a label hold a filler
            value and must be ignored).
        has_target: ``{task: bool[B]}``: which samples carry a label for the task.
        meta: anything else per batch (sample ids, ...).
        present: ``bool[B, M]`` for multi-modal inputs: which modalities each sample has, the
            columns in :attr:`modalities` order (``None`` for single-tensor inputs; all True
            when a dict of inputs is given without it). An absent modality's tensor is a
            filler (zeros from :func:`moekit.data.collate.collate_samples`) no model may read.
    """

    inputs: Tensor | dict[str, Tensor]
    targets: dict[str, Tensor]
    has_target: dict[str, Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    present: Tensor | None = None

    def __post_init__(self) -> None:
        if isinstance(self.inputs, Tensor) or not self.inputs:
            return
        shape = (self.batch_size, len(self.inputs))
        if self.present is None:
            self.present = torch.ones(shape, dtype=torch.bool, device=self.first_input.device)
        elif self.present.dtype != torch.bool or tuple(self.present.shape) != shape:
            raise ValueError(
                f"Batch.present: expected bool{list(shape)} (batch, modalities "
                f"{list(self.inputs)}), got {self.present.dtype}{list(self.present.shape)}"
            )

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modality names in column order of :attr:`present` (empty for a tensor input)."""
        return () if isinstance(self.inputs, Tensor) else tuple(self.inputs)

    @property
    def first_input(self) -> Tensor:
        """The image tensor, or the first modality's."""
        return self.inputs if isinstance(self.inputs, Tensor) else next(iter(self.inputs.values()))

    @property
    def batch_size(self) -> int:
        return int(self.first_input.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            _to_device(self.inputs, device),
            _to_device(self.targets, device),
            _to_device(self.has_target, device),
            _to_device(self.meta, device),
            None if self.present is None else self.present.to(device, non_blocking=True),
        )

    def modality_present(self, modality: str) -> Tensor:
        """``bool[B]``: which samples have ``modality`` (its column of :attr:`present`)."""
        if modality not in self.modalities:
            raise KeyError(
                f"Batch has no modality '{modality}'; modalities: {list(self.modalities)}"
            )
        return self.present[:, self.modalities.index(modality)]

    def labelled(self, task: str) -> Tensor:
        """``bool[B]`` mask of samples labelled for ``task`` (all False if the task is absent)."""
        mask = self.has_target.get(task)
        if mask is None:
            return torch.zeros(self.batch_size, dtype=torch.bool, device=self.first_input.device)
        return mask


def run_model(model: Any, batch: Batch, task_mask: Mapping[str, Tensor] | None = None) -> Any:
    """``model(batch.inputs, task_mask=...)``, with ``present=batch.present`` for multi-modal
    batches: the one calling convention of every moekit model (single-modality models need
    not accept ``present``)."""
    if batch.present is None:
        return model(batch.inputs, task_mask=task_mask)
    return model(batch.inputs, task_mask=task_mask, present=batch.present)


@dataclass
class ModelOutput:
    """What every model returns: predictions per task and the routing of every MoE layer."""

    preds: dict[str, Tensor]
    routing: list[RoutingRecord] = field(default_factory=list)
