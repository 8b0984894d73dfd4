"""Per-class decision thresholds tuned for F1 (multi-label classification).

A model trained on imbalanced labels often ranks well but is miscalibrated for a fixed 0.5:
a rare class may need a lower threshold. :func:`tune_thresholds` picks, for each class on
its own, the threshold ``t_c`` for which ``p > t_c`` (the one hard-prediction rule,
:func:`moekit.metrics.base.above_threshold`) has the highest F1 on the given (validation)
probabilities and labels. Tune on a validation split and apply the thresholds to the test
split; thresholds tuned on the test split itself report an optimistic score.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.metrics.base import DEFAULT_THRESHOLD


def candidate_thresholds(probs: Tensor) -> Tensor:
    """Every threshold that gives a different prediction ``p > t`` on ``probs [n]``, descending.

    With the distinct values ``d_1 > ... > d_m``: ``d_1`` (nothing positive), the midpoints
    ``(d_j + d_{j+1}) / 2`` (the ``j`` highest values positive) and ``d_m / 2`` (everything
    positive; left out when ``d_m = 0``, which no threshold ``t ≥ 0`` makes positive).
    """
    values = torch.unique(probs.to(torch.float64)).flip(0)
    candidates = [values[:1], (values[:-1] + values[1:]) / 2]
    if values[-1] > 0:
        candidates.append(values[-1:] / 2)
    return torch.cat(candidates)


def f1_at(probs: Tensor, labels: Tensor, thresholds: Tensor) -> Tensor:
    """F1 ``2 TP / (2 TP + FP + FN)`` of ``probs > t`` for each of ``thresholds [K]`` on one
    class (``probs``, ``labels``: ``[n]``); 0 where it is ``0 / 0``. ``O((n + K) log n)``."""
    order = torch.argsort(probs.to(torch.float64))
    ascending = probs.to(torch.float64)[order]
    positive = (labels[order] > 0.5).to(torch.float64)
    below = torch.cat([positive.new_zeros(1), torch.cumsum(positive, 0)])  # positives <= rank
    at_most = torch.searchsorted(ascending, thresholds.to(torch.float64), right=True)
    predicted = (ascending.numel() - at_most).to(torch.float64)
    true_pos = below[-1] - below[at_most]
    denominator = predicted + below[-1]
    return torch.where(denominator > 0, 2 * true_pos / denominator.clamp(min=1), 0.0)


def tune_thresholds(probs: Tensor, labels: Tensor, default: float = DEFAULT_THRESHOLD) -> Tensor:
    """Per-class thresholds maximising F1 of ``probs > t_c`` on ``probs, labels [N, C]``.

    Every threshold that changes a prediction is tried (:func:`candidate_thresholds`), so the
    F1 reached is the maximum over all thresholds ``t ≥ 0``; among equal F1 the highest
    threshold (the fewest positives) wins. A class without a positive label keeps ``default``
    (F1 is 0 or undefined at every threshold).

    Returns:
        ``float64 [C]`` thresholds.
    """
    if probs.shape != labels.shape or probs.dim() != 2:
        raise ValueError(
            f"tune_thresholds: probabilities {tuple(probs.shape)} and labels "
            f"{tuple(labels.shape)} must both be [N, C]"
        )
    thresholds = torch.full((probs.shape[1],), float(default), dtype=torch.float64)
    for c in range(probs.shape[1]):
        if not bool((labels[:, c] > 0.5).any()):
            continue
        candidates = candidate_thresholds(probs[:, c])
        scores = f1_at(probs[:, c], labels[:, c], candidates)
        thresholds[c] = candidates[int(torch.argmax(scores))]  # first maximum: highest t
    return thresholds
