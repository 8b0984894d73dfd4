"""The ODIR-2019 challenge score (``METRICS: odir_score``).

The challenge (Ocular Disease Intelligent Recognition, Peking University, 2019) ranked
submissions by the mean of three numbers computed on the *flattened* ``[patients, 8]`` matrices
of ground truth ``g`` and predicted probabilities ``p`` — every (patient, label) entry is one
binary decision. Its evaluation code (``ODIR_Metrics`` of the example evaluation script that
came with the challenge data, Shanggong Medical Technology, July 2019) computes, with
scikit-learn and a threshold of 0.5::

    kappa = cohen_kappa_score(g, p > 0.5)
    f1    = f1_score(g, p > 0.5, average="micro")
    auc   = roc_auc_score(g, p)
    final = (kappa + f1 + auc) / 3

On 1-D binary labels, ``average="micro"`` pools both classes (0 and 1): the pooled false
positives of one class are the false negatives of the other, so this "F1" is the **accuracy**
of the flattened decisions, not the F1 of the positive label. It is reproduced as such.

Reported columns: the final score (main value) and ``kappa``, ``f1``, ``auc``. Each needs every
score of the split (AUC), so rows are kept as for the ranking metrics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from moekit.losses.task_losses import is_class_index
from moekit.metrics.base import DEFAULT_THRESHOLD, Threshold, above_threshold, class_thresholds
from moekit.metrics.kappa import CohenKappa
from moekit.metrics.ranking import RankingMetric, roc_auc
from moekit.registry import METRICS


def binary_kappa(truth: Tensor, predicted: Tensor) -> float:
    """Unweighted Cohen's kappa ``(p_o − p_e) / (1 − p_e)`` of two 0/1 vectors (NaN when chance
    agreement is perfect)."""
    confusion = torch.zeros(2, 2, dtype=torch.float64)
    confusion.index_put_(
        (truth.long(), predicted.long()), torch.ones(truth.numel(), dtype=torch.float64), True
    )
    return CohenKappa(2, weights="none").reduce(confusion.flatten())[""]


def odir_challenge_score(truth: Tensor, scores: Tensor, threshold: Threshold) -> dict[str, float]:
    """``{"": final, "kappa", "f1", "auc"}`` of 0/1 ``truth`` and ``scores [N, C]`` (logits:
    the decision is ``sigmoid(score) > threshold``, one threshold or one per class; then both
    are flattened; AUC ranks the scores)."""
    if truth.numel() == 0:
        return {"": math.nan, "kappa": math.nan, "f1": math.nan, "auc": math.nan}
    predicted = above_threshold(torch.sigmoid(scores.float()), threshold).reshape(-1)
    truth = truth.reshape(-1) > 0.5
    scores = scores.reshape(-1)
    kappa = binary_kappa(truth, predicted)
    f1 = float((predicted == truth).double().mean())  # micro F1 over both classes = accuracy
    auc = roc_auc(scores, truth)
    return {"": (kappa + f1 + auc) / 3, "kappa": kappa, "f1": f1, "auc": auc}


@METRICS.register("odir_score")
class ODIRChallengeScore(RankingMetric):
    """The ODIR-2019 challenge score of multi-label predictions (see the module docstring).

    Args:
        num_classes: labels per sample (8 in the challenge: ``N D G C A H M O``).
        class_names: accepted for a uniform interface; the score pools all labels.
        threshold: probability threshold of the hard decisions (the challenge's 0.5), or one
            per class; the engine passes ``eval.threshold`` when set, or the thresholds tuned
            on validation (``eval.thresholds: tune``).
    """

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        threshold: float | Sequence[float] = DEFAULT_THRESHOLD,
    ) -> None:
        self.threshold = class_thresholds(threshold, num_classes)
        super().__init__(num_classes, class_names, average="micro")

    def stats(self, preds: Tensor, targets: Tensor) -> Tensor:
        if is_class_index(preds, targets):
            raise ValueError("odir_score needs multi-label (0/1 per label) targets")
        return super().stats(preds, targets)

    def reduce(self, total: Tensor) -> dict[str, float]:
        scores, labels = self.rows(total)
        return odir_challenge_score(labels, scores, self.threshold)
