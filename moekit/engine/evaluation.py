"""Per-split metric tracking and the evaluation loop.

Names: a value of split ``s`` is ``s/<column>``, where the columns of a split are

- ``loss``: the sum over tasks of the task losses (unweighted, no routing losses);
- ``<task>/loss``: the mean per-sample loss of the task's labelled samples;
- ``<task>/<metric>`` and ``<task>/<metric>/<suffix>`` (per class, ``per_image``...);
- ``mtl_delta/<variant>`` and ``mtl_delta/<task>/<metric>`` when ``eval.mtl_delta`` is set.

Training adds ``objective`` (the minimised total), ``aux/<name>``, ``<task>/weight``,
``lr/<group>`` and ``time``. With ``eval.thresholds: tune`` an evaluation of a multi-label task
also reports ``<task>/threshold/<class>``: the per-class thresholds it tuned (on ``val``) or
applied (on any other split), at which its thresholded metrics are computed.

Every statistic is additive per sample, so the values of a split are exact under any batching
and process count: evaluation gathers per-sample rows with ``accelerator.gather_for_metrics``
(which drops the samples padded into the last batch).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor

from moekit.metrics.base import Metric
from moekit.metrics.thresholds import tune_thresholds
from moekit.registry import METRICS, accepted_kwargs
from moekit.types import Batch, Task, run_model

Thresholds = Mapping[str, Sequence[float]]
"""Per-class decision thresholds by task (``eval.thresholds``)."""


def thresholded(spec_type: str) -> bool:
    """Whether the metric registered as ``spec_type`` takes a decision ``threshold``."""
    return "threshold" in accepted_kwargs(METRICS.get(spec_type))[0]


def build_metrics(
    task: Task, threshold: float | Sequence[float] | None = None
) -> dict[str, Metric]:
    """The metrics a task's config lists, by column name.

    ``threshold`` (``eval.threshold``, or the task's per-class thresholds) is passed to every
    metric that takes a ``threshold`` and is not given its own in the task's config.
    """
    class_names = task.options.get("class_names")
    metrics = {}
    for spec in task.metrics:
        defaults: dict[str, Any] = {"num_classes": task.num_classes, "class_names": class_names}
        if threshold is not None and thresholded(spec.type):
            defaults["threshold"] = (
                float(threshold) if isinstance(threshold, int | float) else list(threshold)
            )
        metrics[spec.name] = METRICS.build(spec.config(), **defaults)
    return metrics


def threshold_columns(task_name: str, task: Task, values: Sequence[float]) -> dict[str, float]:
    """``{"<task>/threshold/<class>": t}`` of per-class thresholds."""
    names = task.options.get("class_names") or [str(c) for c in range(task.num_classes)]
    return {f"{task_name}/threshold/{c}": float(t) for c, t in zip(names, values, strict=True)}


def read_threshold_columns(
    tasks: Mapping[str, Task], values: Mapping[str, Any]
) -> dict[str, list[float]]:
    """The per-class thresholds of each task found among ``values`` (the columns of
    :func:`threshold_columns`, e.g. a checkpoint's row)."""
    found = {}
    for name, task in tasks.items():
        names = task.options.get("class_names") or [str(c) for c in range(task.num_classes)]
        keys = [f"{name}/threshold/{c}" for c in names]
        if all(values.get(k) is not None for k in keys):
            found[name] = [float(values[k]) for k in keys]
    return found


def logged_columns(tasks: Mapping[str, Task], mtl_delta: Any | None = None) -> list[str]:
    """The columns an evaluation of ``tasks`` reports (``loss``, ``<task>/<metric>``...)."""
    return list(MetricTracker(tasks, mtl_delta).compute())


def metric_directions(tasks: Mapping[str, Task]) -> dict[str, bool]:
    """``{"<task>/<metric>": higher_is_better}`` for every configured metric."""
    return {
        f"{t}/{spec.name}": spec.higher_is_better
        for t, task in tasks.items()
        for spec in task.metrics
    }


class MetricTracker:
    """Accumulates losses and metrics of one split as additive per-sample statistics.

    The columns of metrics that are not additive (ranking metrics: ROC-AUC, average precision)
    are also kept row by row, since they need every sample's scores; across processes those
    rows are gathered, not summed.
    """

    def __init__(
        self,
        tasks: Mapping[str, Task],
        mtl_delta: Any | None = None,
        threshold: float | None = None,
        thresholds: Thresholds | None = None,
    ) -> None:
        self.tasks = dict(tasks)
        per_task = dict(thresholds or {})
        self.metrics = {
            name: build_metrics(task, per_task.get(name, threshold))
            for name, task in self.tasks.items()
        }
        self.mtl_delta = mtl_delta
        self.widths = [2 + sum(m.num_stats for m in ms.values()) for ms in self.metrics.values()]
        self.total = torch.zeros(sum(self.widths), dtype=torch.float64)
        kept, offset = [], 0
        for metrics in self.metrics.values():
            offset += 2
            for metric in metrics.values():
                if not metric.additive:
                    kept.extend(range(offset, offset + metric.num_stats))
                offset += metric.num_stats
        self.kept_columns = torch.tensor(kept, dtype=torch.long)
        self.kept: list[Tensor] = []

    def rows(
        self, preds: Mapping[str, Tensor], batch: Batch, sample_losses: Mapping[str, Tensor]
    ) -> Tensor:
        """``[B, S]`` statistics of a batch: per task ``loss·mask, mask``, then each metric."""
        parts = []
        with torch.no_grad():
            for name, metrics in self.metrics.items():
                pred = preds[name].detach()
                mask = batch.labelled(name).to(pred.device)
                parts.append(torch.stack([sample_losses[name].float(), mask.float()], dim=1))
                for metric in metrics.values():
                    parts.append(metric.sample_stats(pred, batch.targets[name], mask))
        return torch.cat(parts, dim=1)

    def accumulate(self, rows: Tensor) -> None:
        """Add a batch's rows, on their device (no host synchronisation)."""
        rows = rows.detach().to(torch.float64)
        self.total = self.total.to(rows.device) + rows.sum(dim=0)
        if self.kept_columns.numel():
            self.kept.append(rows[:, self.kept_columns.to(rows.device)])

    def reduce(self, reduce_sum: Callable[[Tensor], Tensor], device: torch.device) -> None:
        """Sum :attr:`total` over processes (for statistics accumulated locally), and gather
        the kept rows of non-additive metrics from every process (``torch.distributed``)."""
        self.total = reduce_sum(self.total.to(device)).to("cpu", torch.float64)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if self.kept_columns.numel() and distributed and torch.distributed.get_world_size() > 1:
            mine = (
                torch.cat(self.kept).cpu()
                if self.kept
                else torch.zeros(0, len(self.kept_columns), dtype=torch.float64)
            )
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, mine.to(torch.float64))
            self.kept = [torch.cat(gathered)]

    def compute(self) -> dict[str, float]:
        """Column values (without the split prefix)."""
        values: dict[str, float] = {}
        offset = kept_offset = 0
        task_losses = []
        self.total = self.total.to("cpu")
        kept = (
            torch.cat(self.kept).cpu()
            if self.kept
            else torch.zeros(0, len(self.kept_columns), dtype=torch.float64)
        )
        for name, metrics in self.metrics.items():
            loss_sum, count = self.total[offset : offset + 2].tolist()
            offset += 2
            values[f"{name}/loss"] = loss_sum / count if count else math.nan
            if count:
                task_losses.append(values[f"{name}/loss"])
            for metric_name, metric in metrics.items():
                if metric.additive:
                    metric.total = self.total[offset : offset + metric.num_stats].clone()
                else:
                    metric.total = kept[:, kept_offset : kept_offset + metric.num_stats].clone()
                    kept_offset += metric.num_stats
                offset += metric.num_stats
                for suffix, value in metric.compute().items():
                    key = f"{name}/{metric_name}" + (f"/{suffix}" if suffix else "")
                    values[key] = value
        values = {"loss": sum(task_losses) if task_losses else math.nan, **values}
        if self.mtl_delta is not None:
            delta = self.mtl_delta(values, metric_directions(self.tasks))
            values.update({f"mtl_delta/{k}": v for k, v in delta.items()})
        return values


def evaluate_model(
    model: torch.nn.Module,
    batches: Iterable[Batch],
    tasks: Mapping[str, Task],
    threshold: float | None = None,
    device: torch.device | str | None = None,
    mixed_precision: str = "no",
) -> dict[str, float]:
    """Losses and metrics of ``model`` on ``batches`` for ``tasks``, in one process with no
    accelerator (the task losses from the tasks' configs; bf16 autocast with
    ``mixed_precision="bf16"``). ``device`` defaults to where the model's parameters are."""
    from moekit.engine.experiment import build_task_losses
    from moekit.engine.objective import MultiTaskObjective
    from moekit.registry import WEIGHTINGS

    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    weighting = WEIGHTINGS.build({"type": "equal"}, tasks=tasks)
    objective = MultiTaskObjective(model, tasks, build_task_losses(tasks), weighting).to(device)
    bf16 = mixed_precision == "bf16"
    return evaluate_loop(
        model,
        objective,
        batches,
        tasks,
        threshold=threshold,
        autocast=lambda: torch.autocast(device.type, torch.bfloat16, enabled=bf16),
        device=device,
    )


@torch.no_grad()
def evaluate_loop(
    model: torch.nn.Module,
    objective: Any,
    batches: Iterable[Batch],
    tasks: Mapping[str, Task],
    mtl_delta: Any | None = None,
    progress: Callable[[Any], Any] = lambda it: it,
    threshold: float | None = None,
    autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
    gather: Callable[[Any], Any] = lambda rows: rows,
    device: torch.device | str | None = None,
    thresholds: Thresholds | None = None,
    tune: bool = False,
) -> dict[str, float]:
    """Losses and metrics of ``model`` over ``batches``.

    ``objective`` provides the per-sample task losses (:class:`MultiTaskObjective`, unwrapped);
    ``threshold`` is ``eval.threshold`` (see :func:`build_metrics`), ``thresholds`` per-class
    thresholds of some tasks that replace it (tuned earlier, applied unchanged). With ``tune``,
    the thresholds of every multi-label task are tuned on these batches for the highest F1
    per class (:func:`moekit.metrics.thresholds.tune_thresholds`) and its thresholded metrics
    are computed at them. Either way the values include ``<task>/threshold/<class>``. Under
    accelerate the trainer passes its ``autocast`` and ``gather_for_metrics`` (so every process
    gets the same values); ``device``, when given, is where each batch is moved.
    """
    tracker = MetricTracker(tasks, mtl_delta, threshold, thresholds)
    tuned = [name for name, task in tasks.items() if tune and task.kind == "multilabel"]
    kept: dict[str, list[Tensor]] = {name: [] for name in tuned}
    was_training = model.training
    model.eval()
    try:
        for batch in progress(batches):
            if device is not None:
                batch = batch.to(device)
            with autocast():
                preds = run_model(model, batch, batch.has_target).preds
            rows = tracker.rows(preds, batch, objective.sample_losses(preds, batch))
            tracker.accumulate(gather(rows))
            for name in tuned:
                kept[name].append(gather(_score_rows(preds[name], batch, name)).cpu())
    finally:
        model.train(was_training)
    values = tracker.compute()
    for name, chosen in (thresholds or {}).items():
        values.update(threshold_columns(name, tasks[name], chosen))
    for name in tuned:
        values.update(_at_tuned_thresholds(name, tasks[name], torch.cat(kept[name])))
    if tuned and mtl_delta is not None:  # of the values at the tuned thresholds
        delta = mtl_delta(values, metric_directions(tasks))
        values.update({f"mtl_delta/{k}": v for k, v in delta.items()})
    return values


def _score_rows(pred: Tensor, batch: Batch, name: str) -> Tensor:
    """``[B, 2C + 1]``: logits, labels and whether the sample is labelled."""
    pred = pred.detach().float()
    labels = batch.targets[name].to(pred.device).float().reshape(pred.shape)
    labelled = batch.labelled(name).to(pred.device).float().unsqueeze(1)
    return torch.cat([pred, labels, labelled], dim=1)


def _at_tuned_thresholds(name: str, task: Task, rows: Tensor) -> dict[str, float]:
    """Tune ``task``'s per-class thresholds on the kept rows; its thresholded metrics there."""
    classes = task.num_classes
    rows = rows[rows[:, 2 * classes] > 0.5]
    logits, labels = rows[:, :classes], rows[:, classes : 2 * classes]
    chosen = tune_thresholds(torch.sigmoid(logits), labels).tolist()
    values = threshold_columns(name, task, chosen)
    metrics = build_metrics(task, chosen)
    for spec in task.metrics:
        if not thresholded(spec.type):
            continue
        metric = metrics[spec.name]
        metric.update(logits, labels)
        for suffix, value in metric.compute().items():
            values[f"{name}/{spec.name}" + (f"/{suffix}" if suffix else "")] = value
    return values
