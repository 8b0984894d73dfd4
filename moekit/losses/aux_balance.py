"""Load-balancing routing losses: Switch balance, cv² importance and the router z-loss."""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.losses.aux_base import RoutingLoss, valid_rows
from moekit.registry import AUX_LOSSES
from moekit.routing.select import renormalize_weight
from moekit.routing.types import RoutingRecord


def switch_balance(probs: Tensor, index: Tensor, num_experts: int) -> Tensor:
    """Switch Transformer load balance (Fedus et al., JMLR 2022): ``E * sum_e f_e * P_e``.

    ``f_e`` is expert ``e``'s share of the (token, expert) assignments in ``index [n, K]``
    (``-1`` = empty slot; for top-1 the share of tokens) and ``P_e`` the mean probability of
    ``e`` over the tokens. Equals 1 under perfectly uniform routing.
    """
    chosen = index[index >= 0]
    share = torch.bincount(chosen, minlength=num_experts).float() / max(chosen.numel(), 1)
    return num_experts * (share * probs.float().mean(dim=0)).sum()


def cv_squared(x: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation ``Var(x) / (Mean(x)^2 + eps)``.

    ``Var`` is the population variance, as in Shazeer et al.'s tensor2tensor code
    (``tf.nn.moments``); PyTorch ports that call ``Tensor.var()`` use the unbiased one, larger
    by ``E / (E - 1)``.
    """
    x = x.float()
    return x.var(unbiased=False) / (x.mean() ** 2 + eps)


def z_loss(logits: Tensor) -> Tensor:
    """Router z-loss (Zoph et al. 2022, ST-MoE): ``mean_tokens(logsumexp(logits)^2)``."""
    return logits.float().logsumexp(dim=-1).pow(2).mean()


@AUX_LOSSES.register("switch_balance")
class SwitchBalanceLoss(RoutingLoss):
    """Switch load-balance loss ``E * sum_e f_e P_e`` per layer (Fedus et al. 2022), summed.

    Mod-Squad's "modified MoE" baseline applies it over all tasks together; M3ViT applies it per
    task (``per_task: true``: the mean over the tasks present of the per-task loss).

    Config: ``{type: switch_balance, weight: 0.01, per_task: false, layers: null}``.
    """

    def __init__(self, layers: str | None = None, per_task: bool = False) -> None:
        super().__init__(layers)
        self.per_task = per_task

    def layer_loss(self, record: RoutingRecord) -> Tensor:
        probs = renormalize_weight(valid_rows(record, record.routing.probs).float())
        index = valid_rows(record, record.routing.index)
        num_experts = probs.shape[-1]
        task_ids = valid_rows(record, record.task_ids)
        if not self.per_task or task_ids is None:
            return switch_balance(probs, index, num_experts)
        losses = [
            switch_balance(probs[task_ids == t], index[task_ids == t], num_experts)
            for t in task_ids.unique()
        ]
        return torch.stack(losses).mean()


@AUX_LOSSES.register("importance")
class ImportanceLoss(RoutingLoss):
    """Importance loss ``cv²(sum_tokens G(x))`` (Shazeer et al., ICLR 2017), ``G`` being the
    combine weights after selection (0 for unselected experts).

    Config: ``{type: importance, weight: 0.01, layers: null}``.
    """

    def layer_loss(self, record: RoutingRecord) -> Tensor:
        weights = valid_rows(record, record.routing.dense_weight())
        return cv_squared(weights.sum(dim=0))


@AUX_LOSSES.register("z_loss")
class ZLoss(RoutingLoss):
    """Router z-loss ``mean(logsumexp(logits)^2)`` (Zoph et al. 2022, ST-MoE), which keeps the
    gate logits small.

    Config: ``{type: z_loss, weight: 0.001, layers: null}``.
    """

    def layer_loss(self, record: RoutingRecord) -> Tensor:
        return z_loss(valid_rows(record, record.routing.logits))
