"""Per-split metric tracking and the evaluation loop.

Names: a value of split ``s`` is ``s/<column>``, where the columns of a split are

- ``loss``: the sum over tasks of the task losses (unweighted, no routing losses);
- ``<task>/loss``: the mean per-sample loss of the task's labelled samples;
- ``<task>/<metric>`` and ``<task>/<metric>/<suffix>`` (per class, ``per_image``...);
- ``mtl_delta/<variant>`` and ``mtl_delta/<task>/<metric>`` when ``eval.mtl_delta`` is set.

Training adds ``objective`` (the minimised total), ``aux/<name>``, ``<task>/weight``,
``lr/<group>`` and ``time``. Every statistic is additive per sample, so the values of a split
are exact under any batching and process count: evaluation gathers per-sample rows with
``accelerator.gather_for_metrics`` (which drops the samples padded into the last batch).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor

from moekit.metrics.base import Metric
from moekit.registry import METRICS, accepted_kwargs
from moekit.types import Batch, Task, run_model


def build_metrics(task: Task, threshold: float | None = None) -> dict[str, Metric]:
    """The metrics a task's config lists, by column name.

    ``threshold`` (``eval.threshold``) is passed to every metric that takes a ``threshold`` and
    is not given its own in the task's config.
    """
    class_names = task.options.get("class_names")
    metrics = {}
    for spec in task.metrics:
        defaults: dict[str, Any] = {"num_classes": task.num_classes, "class_names": class_names}
        if threshold is not None and "threshold" in accepted_kwargs(METRICS.get(spec.type))[0]:
            defaults["threshold"] = float(threshold)
        metrics[spec.name] = METRICS.build(spec.config(), **defaults)
    return metrics


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
    ) -> None:
        self.tasks = dict(tasks)
        self.metrics = {name: build_metrics(task, threshold) for name, task in self.tasks.items()}
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
) -> dict[str, float]:
    """Losses and metrics of ``model`` over ``batches``.

    ``objective`` provides the per-sample task losses (:class:`MultiTaskObjective`, unwrapped);
    ``threshold`` is ``eval.threshold`` (see :func:`build_metrics`). Under accelerate the
    trainer passes its ``autocast`` and ``gather_for_metrics`` (so every process gets the same
    values); ``device``, when given, is where each batch is moved.
    """
    tracker = MetricTracker(tasks, mtl_delta, threshold)
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
    finally:
        model.train(was_training)
    return tracker.compute()
