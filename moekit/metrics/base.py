"""The metric interface: additive per-sample statistics, summed over a split, then reduced.

A metric never averages batch scores. It turns each sample into a row of *sufficient
statistics* (counts of correct predictions, intersections and unions, a confusion matrix...)
that add up across samples, batches and processes; :meth:`Metric.compute` reduces the sum to
values. So the score of a split is the same however it is batched or sharded, and a
distributed evaluation only has to gather (or all-reduce) the rows.

Usage on one process::

    metric = METRICS.build({"type": "dice"}, num_classes=5)
    for batch in loader:
        metric.update(preds, targets, mask)          # mask: bool[B], labelled samples
    metric.compute()   # {"": mean over classes, "MA": ..., "per_image": ..., ...}

Across processes: gather ``metric.sample_stats(preds, targets, mask)`` rows (e.g. with
``accelerator.gather_for_metrics``) and :meth:`Metric.accumulate` them, or all-reduce
:attr:`Metric.total`.

Ranking metrics (ROC-AUC, average precision) are the exception: no fixed-size sum determines
them, so their rows (one per sample: its scores and labels) are *kept*, not summed
(:attr:`Metric.additive` is ``False``), and gathered rather than all-reduced across processes.
The score of a split is again independent of batching and sharding.

``compute()`` returns ``{"": main value, suffix: value, ...}``; the engine names the columns
``task/metric`` and ``task/metric/suffix``. Per-class suffixes are the class names (given as
``class_names``) or the class indices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.losses.task_losses import dense_targets, is_class_index

DEFAULT_THRESHOLD = 0.5
"""The probability threshold of every thresholded metric and of the prediction overlays, unless
a metric is given its own ``threshold`` or the config sets ``eval.threshold``."""


Threshold = float | Tensor
"""A decision threshold: one number, or one per class (``float64 [C]``, along dim 1)."""


def above_threshold(probs: Tensor, threshold: Threshold = DEFAULT_THRESHOLD) -> Tensor:
    """``probs > threshold``: the one rule that turns probabilities into hard predictions (metrics
    and prediction overlays alike, so a pixel at exactly the threshold is negative in both).

    ``threshold`` is one number or a ``[C]`` tensor of per-class thresholds compared along
    dim 1 of ``probs [N, C, *spatial]`` (compared in float64, as they were tuned)."""
    if isinstance(threshold, Tensor):
        shape = (1, -1, *([1] * (probs.dim() - 2)))
        return probs > threshold.to(probs.device).view(shape)
    return probs > threshold


def class_thresholds(threshold: float | Sequence[float] | Tensor, num_classes: int) -> Threshold:
    """A metric's ``threshold`` argument: a number in ``[0, 1)``, or one per class (``C``
    numbers, returned as ``float64 [C]``); anything else is a ``ValueError``."""
    if isinstance(threshold, int | float) and not isinstance(threshold, bool):
        values = torch.tensor([float(threshold)], dtype=torch.float64)
    else:
        values = torch.as_tensor(threshold, dtype=torch.float64).reshape(-1)
        if values.numel() != num_classes:
            raise ValueError(
                f"threshold: {values.numel()} per-class values for {num_classes} classes"
            )
    if bool(((values < 0) | (values >= 1)).any()):
        raise ValueError(f"threshold: expected values in [0, 1), got {values.tolist()}")
    return float(values[0]) if isinstance(threshold, int | float) else values


class Metric:
    """Base class of per-task metrics.

    Subclasses set :attr:`higher_is_better` and implement :attr:`num_stats` (from
    ``num_classes``), :meth:`stats` (per-sample statistics of labelled rows) and :meth:`reduce`.
    """

    higher_is_better: ClassVar[bool]
    additive: ClassVar[bool] = True
    """Whether rows of statistics are summed (:attr:`total` is ``[num_stats]``) or kept
    (``[N, num_stats]``, every row accumulated: ranking metrics, which need every score)."""

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None) -> None:
        self.num_classes = int(num_classes)
        if class_names is not None and len(class_names) != self.num_classes:
            raise ValueError(f"{len(class_names)} class names for {self.num_classes} classes")
        self.class_names = [str(c) for c in (class_names or range(self.num_classes))]
        self.reset()

    @property
    def num_stats(self) -> int:
        """Length of a row of statistics."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget everything accumulated."""
        shape = (self.num_stats,) if self.additive else (0, self.num_stats)
        self.total = torch.zeros(shape, dtype=torch.float64)

    def stats(self, preds: Tensor, targets: Tensor) -> Tensor:
        """``[N, num_stats]`` float statistics of ``N`` labelled samples (additive)."""
        raise NotImplementedError

    def reduce(self, total: Tensor) -> dict[str, float]:
        """Metric values from summed statistics ``[num_stats]`` (kept rows ``[N, num_stats]``
        for a metric that is not :attr:`additive`)."""
        raise NotImplementedError

    def sample_stats(self, preds: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
        """``[B, num_stats]`` statistics with zero rows for unlabelled samples (``~mask``)."""
        if mask is None:
            return self.stats(preds, targets).float()
        out = preds.new_zeros((preds.shape[0], self.num_stats), dtype=torch.float32)
        if bool(mask.any()):
            out[mask] = self.stats(preds[mask], targets[mask]).float()
        return out

    def accumulate(self, stats: Tensor) -> None:
        """Add rows of statistics (from :meth:`sample_stats`, possibly gathered): summed, or
        appended when the metric is not :attr:`additive`."""
        rows = stats.detach().to("cpu", torch.float64)
        self.total = (
            self.total + rows.sum(dim=0) if self.additive else torch.cat([self.total, rows])
        )

    def update(self, preds: Tensor, targets: Tensor, mask: Tensor | None = None) -> None:
        """Accumulate one batch (``mask``: ``bool[B]`` labelled samples, default all)."""
        with torch.no_grad():
            self.accumulate(self.sample_stats(preds, targets, mask))

    def compute(self) -> dict[str, float]:
        """Values of everything accumulated; NaN where nothing was labelled."""
        return self.reduce(self.total)

    def per_class(self, values: Tensor, prefix: str = "") -> dict[str, float]:
        """``{prefix + class name: value}`` for a ``[C]`` tensor (only when ``C > 1``)."""
        if self.num_classes < 2:
            return {}
        return {prefix + name: float(v) for name, v in zip(self.class_names, values.tolist())}


def safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` with NaN where ``den == 0`` (an undefined score, left out of means)."""
    return torch.where(den > 0, num / den.clamp(min=1e-300), torch.full_like(num, math.nan))


def nanmean(values: Tensor) -> float:
    """Mean of the defined (non-NaN) entries; NaN when none is defined."""
    defined = values[~torch.isnan(values)]
    return float(defined.mean()) if defined.numel() else math.nan


def binarize(
    preds: Tensor,
    targets: Tensor,
    threshold: Threshold = DEFAULT_THRESHOLD,
    ignore_index: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Hard predictions and targets as one-hot booleans ``[N, C, *spatial]``.

    Class-index targets: the prediction is the arg-max class; positions whose target is
    ``ignore_index`` are invalid. Dense targets: the prediction is ``sigmoid(x) > threshold``
    per channel (:func:`above_threshold`; one threshold or one per channel) and the target is
    ``y > 0.5``. Returns ``(pred, target, valid [N, 1, *spatial])``.
    """
    if is_class_index(preds, targets):
        valid = torch.ones_like(targets, dtype=torch.bool)
        if ignore_index is not None:
            valid = targets != ignore_index
        num_classes = preds.shape[1]
        safe = torch.where(valid, targets.long(), torch.zeros_like(targets, dtype=torch.long))
        pred = F.one_hot(preds.argmax(dim=1), num_classes).movedim(-1, 1).bool()
        target = F.one_hot(safe, num_classes).movedim(-1, 1).bool()
        return pred, target, valid.unsqueeze(1)
    target = dense_targets(preds, targets) > 0.5
    pred = above_threshold(torch.sigmoid(preds.float()), threshold)
    return pred, target, torch.ones_like(pred[:, :1])


def per_sample_sum(values: Tensor) -> Tensor:
    """``[N, C, *spatial] -> [N, C]`` sums over the spatial positions."""
    return values.reshape(values.shape[0], values.shape[1], -1).sum(dim=2).float()
