"""Regression metrics for dense maps: RMSE, MAE and the angular error of surface normals.

Each value is pooled over every element of the split (dataset level, like the segmentation
metrics): ``RMSE = sqrt(Σ (x - y)² / N)`` and ``MAE = Σ |x - y| / N`` over all ``N`` output
elements of the labelled samples, so a split's score does not depend on its batching. Targets
are dense (shaped like the predictions, or ``[N, *spatial]`` for a one-channel output).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.losses.task_losses import dense_targets
from moekit.metrics.base import Metric, safe_div
from moekit.registry import METRICS


class PooledErrorMetric(Metric):
    """``[Σ error, N]`` per sample; the main value is ``Σ error / N`` over the split."""

    higher_is_better = False

    @property
    def num_stats(self) -> int:
        return 2

    def errors(self, preds: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """``(error [N, ...], valid [N, ...])`` per element."""
        raise NotImplementedError

    def stats(self, preds: Tensor, targets: Tensor) -> Tensor:
        error, valid = self.errors(preds.float(), targets)
        error = torch.where(valid, error, torch.zeros_like(error))
        return torch.stack([error.flatten(1).sum(1), valid.flatten(1).sum(1).float()], dim=1)

    def reduce(self, total: Tensor) -> dict[str, float]:
        return {"": float(safe_div(total[0], total[1]))}


@METRICS.register("mae")
class MAE(PooledErrorMetric):
    """Mean absolute error ``Σ |x - y| / N`` over all elements of the split."""

    def errors(self, preds: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        error = (preds - dense_targets(preds, targets)).abs()
        return error, torch.ones_like(error, dtype=torch.bool)


@METRICS.register("rmse")
class RMSE(PooledErrorMetric):
    """Root mean squared error ``sqrt(Σ (x - y)² / N)`` over all elements of the split (the
    depth metric of Mod-Squad's Taskonomy table)."""

    def errors(self, preds: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        error = (preds - dense_targets(preds, targets)) ** 2
        return error, torch.ones_like(error, dtype=torch.bool)

    def reduce(self, total: Tensor) -> dict[str, float]:
        return {"": math.sqrt(float(safe_div(total[0], total[1])))}


@METRICS.register("angular_error")
class AngularError(PooledErrorMetric):
    """Mean angle in degrees between predicted and target surface normals (``mErr`` of
    PASCAL-Context / ASTMT, Maninis et al. 2019), over the valid pixels of the split.

    Predictions ``[N, 3, H, W]`` are normalised per pixel; target pixels holding the zero
    vector are invalid and left out (the PASCAL-Context loader marks unlabelled normals so).
    """

    def errors(self, preds: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        target = dense_targets(preds, targets)
        valid = target.norm(dim=1) > 0
        cosine = (F.normalize(preds, dim=1) * F.normalize(target, dim=1)).sum(dim=1)
        return torch.rad2deg(torch.acos(cosine.clamp(-1.0, 1.0))), valid
