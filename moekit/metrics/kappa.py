"""Cohen's kappa with quadratic (or linear) weights, for ordinal grades (DR grading)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from moekit.errors import ConfigError
from moekit.losses.task_losses import is_class_index
from moekit.metrics.base import Metric, binarize, safe_div
from moekit.registry import METRICS


@METRICS.register("kappa")
class CohenKappa(Metric):
    """Weighted Cohen's kappa ``κ = 1 - Σ w_ij O_ij / Σ w_ij E_ij`` (Cohen 1968).

    ``O`` is the confusion matrix (rows: target, columns: arg-max prediction), ``E`` the matrix
    expected by chance from its marginals (``E = r cᵀ / N``) and ``w_ij = (i - j)² / (C - 1)²``
    (``weights: quadratic``, the default and the usual DR-grading score), ``|i - j| / (C - 1)``
    (``linear``) or ``1 - δ_ij`` (``none``: plain kappa). Needs class-index targets. NaN when
    chance agreement is perfect (a single class in both targets and predictions), as in
    scikit-learn.
    """

    higher_is_better = True

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        weights: Literal["quadratic", "linear", "none"] = "quadratic",
    ) -> None:
        if weights not in ("quadratic", "linear", "none"):
            raise ConfigError(f"kappa.weights: '{weights}' is not quadratic, linear or none")
        if num_classes < 2:
            raise ConfigError("kappa: needs num_classes >= 2")
        self.weights = weights
        super().__init__(num_classes, class_names)

    @property
    def num_stats(self) -> int:
        return self.num_classes**2

    def stats(self, preds: Tensor, targets: Tensor) -> Tensor:
        if not is_class_index(preds, targets):
            raise ValueError("kappa needs class-index targets")
        pred, target, valid = binarize(preds, targets)
        c = self.num_classes
        pred = (pred & valid).reshape(pred.shape[0], c, -1).float()
        target = target.reshape(target.shape[0], c, -1).float()
        return torch.einsum("nip,njp->nij", target, pred).reshape(-1, c * c)

    def reduce(self, total: Tensor) -> dict[str, float]:
        c = self.num_classes
        observed = total.view(c, c)
        n = observed.sum()
        expected = observed.sum(1, keepdim=True) * observed.sum(0, keepdim=True) / n
        i = torch.arange(c, dtype=torch.float64)
        distance = (i[:, None] - i[None, :]).abs() / (c - 1)
        weight = {"quadratic": distance**2, "linear": distance, "none": (distance > 0).double()}[
            self.weights
        ]
        disagreement = safe_div((weight * observed).sum(), (weight * expected).sum())
        return {"": float(1 - disagreement)}
