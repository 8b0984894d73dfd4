"""Ranking metrics: ROC-AUC and average precision, per class and averaged.

Both depend on the order of *every* score of a split, so no fixed-size sum of per-sample
statistics determines them: they keep one row per labelled sample (its scores and labels,
:attr:`Metric.additive` ``False``) and compute exactly from all rows. The score of a split is
therefore the same however it is batched or sharded (rows are gathered across processes).

Scores are the raw outputs for sigmoid (multi-label, binary) predictions — a monotone map of
the probabilities, so every rank is the probabilities' rank, without float32 saturation of
``sigmoid`` turning confident predictions into ties — and softmax probabilities for
class-index targets (one class against the rest).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from moekit.errors import ConfigError
from moekit.losses.task_losses import dense_targets, is_class_index
from moekit.metrics.base import Metric, nanmean
from moekit.registry import METRICS


def average_ranks(values: Tensor) -> Tensor:
    """1-based ranks of ``values [n]`` in ascending order; tied values share their mean rank."""
    order = torch.argsort(values, stable=True)
    _, counts = torch.unique_consecutive(values[order], return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)
    mean_rank = ends - (counts.to(torch.float64) - 1) / 2
    ranks = torch.empty(values.shape[0], dtype=torch.float64, device=values.device)
    ranks[order] = torch.repeat_interleave(mean_rank, counts)
    return ranks


def roc_auc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve of one binary problem (Hanley & McNeil 1982).

    ``AUC = P(s⁺ > s⁻) + ½ P(s⁺ = s⁻)`` over all (positive, negative) pairs, computed from the
    Mann–Whitney statistic ``(Σ ranks of the positives − n⁺(n⁺ + 1)/2) / (n⁺ n⁻)`` with tied
    scores at their mean rank — the trapezoidal area under the ROC curve, as scikit-learn's
    ``roc_auc_score``. NaN unless both classes occur.

    Args:
        scores: ``[n]`` scores (higher: more likely positive).
        labels: ``[n]`` 0/1 (or bool) labels.
    """
    positive = labels.reshape(-1) > 0.5
    n_pos = int(positive.sum())
    n_neg = positive.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = average_ranks(scores.reshape(-1).to(torch.float64))
    u = float(ranks[positive].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def average_precision(scores: Tensor, labels: Tensor) -> float:
    """Average precision ``AP = Σ_k (R_k − R_{k−1}) P_k`` (no interpolation).

    ``P_k`` and ``R_k`` are the precision and recall of ``score ≥ t_k`` at the distinct scores
    ``t_1 > t_2 > ...`` (tied scores enter together), ``R_0 = 0`` — the step-wise area under
    the precision–recall curve, as scikit-learn's ``average_precision_score``. NaN without a
    positive.
    """
    positive = (labels.reshape(-1) > 0.5).to(torch.float64)
    total = float(positive.sum())
    if total == 0:
        return math.nan
    values = scores.reshape(-1).to(torch.float64)
    order = torch.argsort(values, descending=True, stable=True)
    values, positive = values[order], positive[order]
    true_pos = torch.cumsum(positive, 0)
    # the last position of each run of equal scores closes a threshold
    last = torch.ones_like(values, dtype=torch.bool)
    last[:-1] = values[1:] != values[:-1]
    true_pos = true_pos[last]
    predicted = (torch.nonzero(last).squeeze(1) + 1).to(torch.float64)
    precision = true_pos / predicted
    recall = true_pos / total
    steps = torch.diff(recall, prepend=recall.new_zeros(1))
    return float((steps * precision).sum())


class RankingMetric(Metric):
    """A metric computed from every score: rows ``[labelled, scores (C), labels (C)]`` are kept.

    ``average: macro`` (default) is the mean of the per-class values over the classes where
    the value is defined (both labels present for ROC-AUC, a positive for AP); ``micro``
    computes one value over the flattened ``[N·C]`` scores and labels. Per-class values are
    reported under the class names. Image-level predictions ``[N, C]`` only.
    """

    higher_is_better = True
    additive = False

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        average: Literal["macro", "micro"] = "macro",
    ) -> None:
        if average not in ("macro", "micro"):
            raise ConfigError(f"{type(self).__name__}.average: '{average}' is not macro or micro")
        self.average = average
        super().__init__(num_classes, class_names)

    @property
    def num_stats(self) -> int:
        return 1 + 2 * self.num_classes

    def stats(self, preds: Tensor, targets: Tensor) -> Tensor:
        if preds.dim() != 2:
            raise ValueError(
                f"{type(self).__name__} needs image-level predictions [N, C], got shape "
                f"{tuple(preds.shape)}"
            )
        preds = preds.float()
        scores = preds.softmax(dim=1) if is_class_index(preds, targets) else preds
        labels = (dense_targets(preds, targets) > 0.5).float()
        return torch.cat([torch.ones_like(scores[:, :1]), scores, labels], dim=1)

    def rows(self, total: Tensor) -> tuple[Tensor, Tensor]:
        """``(scores [N, C], labels [N, C])`` of the labelled rows among ``total``."""
        kept = total[total[:, 0] > 0.5]
        c = self.num_classes
        return kept[:, 1 : 1 + c], kept[:, 1 + c :]

    def score(self, scores: Tensor, labels: Tensor) -> float:
        """The metric of one binary problem."""
        raise NotImplementedError

    def reduce(self, total: Tensor) -> dict[str, float]:
        scores, labels = self.rows(total)
        if scores.shape[0] == 0:
            return {"": math.nan, **self.per_class(torch.full((self.num_classes,), math.nan))}
        per_class = torch.tensor(
            [self.score(scores[:, c], labels[:, c]) for c in range(self.num_classes)],
            dtype=torch.float64,
        )
        if self.average == "micro":
            main = self.score(scores.flatten(), labels.flatten())
        else:
            main = nanmean(per_class)
        return {"": main, **self.per_class(per_class)}


@METRICS.register("roc_auc")
class ROCAUC(RankingMetric):
    """ROC-AUC per class (one class against the rest), macro- (or micro-) averaged."""

    def score(self, scores: Tensor, labels: Tensor) -> float:
        return roc_auc(scores, labels)


@METRICS.register("average_precision")
class AveragePrecision(RankingMetric):
    """Average precision per class, macro- (or micro-) averaged (mAP for ``macro``)."""

    def score(self, scores: Tensor, labels: Tensor) -> float:
        return average_precision(scores, labels)
