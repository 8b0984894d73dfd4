"""Task weightings (registry ``WEIGHTINGS``): per-task losses -> one scalar to minimise.

A weighting is an ``nn.Module`` built as ``WEIGHTINGS.build(cfg, tasks=tasks)`` and called with
the losses of the tasks present in the batch (a task without any labelled sample is left out,
so it neither contributes nor moves learned weights). Learned weightings hold parameters; the
trainer optimises them with the model and saves them with each checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from moekit.errors import ConfigError, did_you_mean
from moekit.registry import WEIGHTINGS
from moekit.types import Task


class Weighting(nn.Module):
    """Base class: ``forward(losses) -> total``; ``weights()`` reports the current factors."""

    def __init__(self, tasks: Mapping[str, Task]) -> None:
        super().__init__()
        self.task_names = list(tasks)

    def forward(self, losses: Mapping[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def weights(self) -> dict[str, float]:
        """The factor each task loss is multiplied by, for logging."""
        raise NotImplementedError


def _sum(terms: list[Tensor]) -> Tensor:
    return torch.stack(terms).sum() if terms else torch.zeros(())


@WEIGHTINGS.register("equal")
class EqualWeighting(Weighting):
    """``L = Σ_t L_t``: every task loss with weight 1 (LibMTL's EW)."""

    def forward(self, losses: Mapping[str, Tensor]) -> Tensor:
        return _sum(list(losses.values()))

    def weights(self) -> dict[str, float]:
        return dict.fromkeys(self.task_names, 1.0)


@WEIGHTINGS.register("fixed")
class FixedWeighting(Weighting):
    """``L = Σ_t w_t L_t`` with weights from the config (tasks left out get ``default``)."""

    def __init__(
        self, tasks: Mapping[str, Task], weights: Mapping[str, float], default: float = 1.0
    ) -> None:
        super().__init__(tasks)
        for name in weights:
            if name not in tasks:
                raise ConfigError(
                    f"weighting.weights: unknown task '{name}'; tasks: {', '.join(tasks)}"
                    f"{did_you_mean(name, tasks)}"
                )
        self.task_weights = {t: float(weights.get(t, default)) for t in tasks}

    def forward(self, losses: Mapping[str, Tensor]) -> Tensor:
        return _sum([self.task_weights[t] * loss for t, loss in losses.items()])

    def weights(self) -> dict[str, float]:
        return dict(self.task_weights)


@WEIGHTINGS.register("uncertainty")
class UncertaintyWeighting(Weighting):
    """Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018).

    With a learned ``s_t = log σ_t²`` per task (initialised to ``init``):

    - regression tasks (Gaussian likelihood, paper eq. 5): ``½ exp(-s_t) L_t + ½ s_t``;
    - classification kinds (``multiclass``, ``multilabel``, ``segmentation``; softmax
      likelihood, paper eq. 10): ``exp(-s_t) L_t + ½ s_t``.

    The ``½`` factors follow the paper (``log σ = ½ s``); many implementations drop them.
    """

    def __init__(self, tasks: Mapping[str, Task], init: float = 0.0) -> None:
        super().__init__(tasks)
        self.log_vars = nn.Parameter(torch.full((len(tasks),), float(init)))
        scale = [0.5 if task.kind == "regression" else 1.0 for task in tasks.values()]
        self.register_buffer("loss_scale", torch.tensor(scale), persistent=False)
        self.index = {name: i for i, name in enumerate(tasks)}

    def forward(self, losses: Mapping[str, Tensor]) -> Tensor:
        terms = []
        for name, loss in losses.items():
            i = self.index[name]
            s = self.log_vars[i]
            terms.append(self.loss_scale[i] * torch.exp(-s) * loss + 0.5 * s)
        return _sum(terms)

    def weights(self) -> dict[str, float]:
        factors = self.loss_scale.cpu() * torch.exp(-self.log_vars.detach().float().cpu())
        return {name: float(factors[i]) for name, i in self.index.items()}
