"""Classification metrics: accuracy, and per-class / macro precision, recall and F1.

They work for multiclass outputs (arg-max against class indices), multi-label and binary
outputs (``sigmoid > threshold`` per class against dense 0/1 targets; ``threshold`` is one
number or one per class, e.g. tuned on validation by :mod:`moekit.metrics.thresholds`) and per
pixel for segmentation maps (the IDRiD paper's "pixel accuracy" is the per-class ``recall``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from moekit.errors import ConfigError
from moekit.losses.task_losses import is_class_index
from moekit.metrics.base import (
    Metric,
    binarize,
    class_thresholds,
    nanmean,
    per_sample_sum,
    safe_div,
)
from moekit.registry import METRICS


@METRICS.register("accuracy")
class Accuracy(Metric):
    """Share of correct predictions.

    Class indices: arg-max equals the target (per sample, or per pixel for maps). Dense
    targets: per label (``subset: false``, every label of every sample counts once) or the
    exact match of all labels of a sample (``subset: true``).
    """

    higher_is_better = True

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        threshold: float | Sequence[float] = 0.5,
        subset: bool = False,
        ignore_index: int | None = None,
    ) -> None:
        self.threshold = class_thresholds(threshold, num_classes)
        self.subset = bool(subset)
        self.ignore_index = ignore_index
        super().__init__(num_classes, class_names)

    @property
    def num_stats(self) -> int:
        return 2

    def stats(self, preds: Tensor, targets: Tensor) -> Tensor:
        pred, target, valid = binarize(preds, targets, self.threshold, self.ignore_index)
        if is_class_index(preds, targets):
            correct = (pred & target).any(dim=1, keepdim=True) & valid
            return torch.stack([per_sample_sum(correct)[:, 0], per_sample_sum(valid)[:, 0]], 1)
        equal = (pred == target).reshape(pred.shape[0], -1).float()
        if self.subset:
            return torch.stack([equal.min(dim=1).values, torch.ones_like(equal[:, 0])], 1)
        return torch.stack([equal.sum(1), torch.full_like(equal[:, 0], equal.shape[1])], 1)

    def reduce(self, total: Tensor) -> dict[str, float]:
        return {"": float(safe_div(total[0], total[1]))}


class PerClassMetric(Metric):
    """Precision, recall or F1 per class from true/false positives and false negatives.

    ``average: macro`` (default) is the mean of the per-class scores over the classes that occur
    in the targets or the predictions; a class that occurs but whose score is ``0 / 0`` (a
    class never predicted has no precision) scores ``zero_division`` (0, as scikit-learn's
    ``zero_division=0``; ``null`` leaves it out of the mean). A class absent from both is
    reported as NaN and left out. ``micro`` pools the counts of all classes first. Per-class
    scores are reported under the class names.
    """

    higher_is_better = True

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        threshold: float | Sequence[float] = 0.5,
        average: Literal["macro", "micro"] = "macro",
        ignore_index: int | None = None,
        zero_division: float | None = 0.0,
    ) -> None:
        if average not in ("macro", "micro"):
            raise ConfigError(f"{type(self).__name__}.average: '{average}' is not macro or micro")
        self.zero_division = zero_division
        self.threshold = class_thresholds(threshold, num_classes)
        self.average = average
        self.ignore_index = ignore_index
        super().__init__(num_classes, class_names)

    @property
    def num_stats(self) -> int:
        return 3 * self.num_classes

    def stats(self, preds: Tensor, targets: Tensor) -> Tensor:
        pred, target, valid = binarize(preds, targets, self.threshold, self.ignore_index)
        tp = per_sample_sum(pred & target & valid)
        fp = per_sample_sum(pred & ~target & valid)
        fn = per_sample_sum(~pred & target & valid)
        return torch.cat([tp, fp, fn], dim=1)

    def score(self, tp: Tensor, fp: Tensor, fn: Tensor) -> Tensor:
        raise NotImplementedError

    def reduce(self, total: Tensor) -> dict[str, float]:
        tp, fp, fn = total.view(3, self.num_classes)
        per_class = self.score(tp, fp, fn)
        occurs = tp + fp + fn > 0
        if self.zero_division is not None:
            undefined = occurs & torch.isnan(per_class)
            per_class = torch.where(undefined, float(self.zero_division), per_class)
        if self.average == "micro":
            main = float(self.score(tp.sum(), fp.sum(), fn.sum()))
        else:
            main = nanmean(per_class)
        return {"": main, **self.per_class(per_class)}


@METRICS.register("precision")
class Precision(PerClassMetric):
    """Precision ``TP / (TP + FP)`` per class, macro- (or micro-) averaged."""

    def score(self, tp: Tensor, fp: Tensor, fn: Tensor) -> Tensor:
        return safe_div(tp, tp + fp)


@METRICS.register("recall")
class Recall(PerClassMetric):
    """Recall (sensitivity) ``TP / (TP + FN)`` per class, macro- (or micro-) averaged."""

    def score(self, tp: Tensor, fp: Tensor, fn: Tensor) -> Tensor:
        return safe_div(tp, tp + fn)


@METRICS.register("f1")
class F1(PerClassMetric):
    """F1 ``2 TP / (2 TP + FP + FN)`` per class, macro- (or micro-) averaged.

    Macro F1 is the ODIR study's model-selection metric.
    """

    def score(self, tp: Tensor, fp: Tensor, fn: Tensor) -> Tensor:
        return safe_div(2 * tp, 2 * tp + fp + fn)
