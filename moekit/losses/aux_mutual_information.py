"""Mutual information between tasks (or modalities) and experts.

Mod-Squad (Chen et al., CVPR 2023, eq. 5-7) maximises ``I(T; E)`` per MoE layer; M4oE (Wu et
al., ICLR 2025) maximises ``I(M; E | T)`` between modalities and experts given the task. Both are
formed from batch statistics: per-group sums of the routing probabilities over *all* experts (soft
assignments, not just the selected experts) and per-group token counts. The statistics are
summed by a ``reduce`` function before the probabilities are formed; by default an
autograd-aware all-reduce, so under data parallelism the MI is that of the global batch (a
batch with one task gives ``P(T) = 1`` and ``I = 0``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.losses.aux_base import (
    EPS,
    Reduce,
    RoutingLoss,
    all_reduce_sum,
    num_ids,
    valid_rows,
)
from moekit.registry import AUX_LOSSES
from moekit.routing.select import renormalize_weight
from moekit.routing.types import RoutingRecord


def group_statistics(probs: Tensor, group_ids: Tensor, num_groups: int) -> Tensor:
    """``[G, E + 1]``: per group, the sum of ``probs`` rows (``[:, :E]``) and the row count."""
    probs = probs.float()
    stats = probs.new_zeros(num_groups, probs.shape[-1] + 1)
    rows = torch.cat([probs, probs.new_ones(probs.shape[0], 1)], dim=-1)
    return stats.index_add(0, group_ids.to(probs.device), rows)


def mutual_information_from_statistics(stats: Tensor, eps: float = EPS) -> Tensor:
    """``I(T; E)`` from ``[T, E + 1]`` task statistics (:func:`group_statistics`).

    ``P(E|T=i)`` = mean probability over task ``i``'s tokens, ``P(T=i)`` = its token share,
    ``P(T, E) = P(E|T) P(T)``, ``P(E) = sum_T P(T, E)`` and
    ``I = sum_{i,j} P(T_i, E_j) log[P(T_i, E_j) / (P(T_i) P(E_j))]`` (eq. 5), in float32 with
    ``eps`` inside the logarithms only.
    """
    sums, counts = stats[:, :-1], stats[:, -1]
    p_task = counts / counts.sum().clamp_min(1.0)
    joint = sums / counts.clamp_min(1.0)[:, None] * p_task[:, None]
    p_expert = joint.sum(dim=0)
    independent = p_task[:, None] * p_expert[None, :]
    return (joint * ((joint + eps).log() - (independent + eps).log())).sum()


def mutual_information(
    probs: Tensor,
    task_ids: Tensor,
    num_tasks: int,
    reduce: Reduce | None = all_reduce_sum,
    eps: float = EPS,
) -> Tensor:
    """Mutual information ``I(T; E)`` in nats between tasks and experts (Mod-Squad eq. 5).

    Args:
        probs: ``[n, E]`` routing probabilities over all experts.
        task_ids: ``[n]`` task of every token.
        num_tasks: ``T``.
        reduce: sums the ``[T, E + 1]`` statistics over processes (None: local batch only).
    """
    stats = group_statistics(probs, task_ids, num_tasks)
    if reduce is not None:
        stats = reduce(stats)
    return mutual_information_from_statistics(stats, eps)


def conditional_mutual_information_from_statistics(stats: Tensor, eps: float = EPS) -> Tensor:
    """``I(M; E | T)`` from ``[T, M, E + 1]`` (task, modality) statistics.

    ``P(e|m,t)`` = mean probability over the tokens of modality ``m`` for task ``t``,
    ``P(m|t)`` = their share of task ``t``'s tokens, ``P(m,e|t) = P(e|m,t) P(m|t)``,
    ``P(e|t) = sum_m P(m,e|t)``, ``P(t)`` = task ``t``'s token share and
    ``I(M;E|T) = sum_t P(t) sum_{m,e} P(m,e|t) log[P(m,e|t) / (P(m|t) P(e|t))]``.
    """
    sums, counts = stats[..., :-1], stats[..., -1]
    task_counts = counts.sum(dim=1)
    p_task = task_counts / task_counts.sum().clamp_min(1.0)
    p_modality = counts / task_counts.clamp_min(1.0)[:, None]
    joint = sums / counts.clamp_min(1.0)[..., None] * p_modality[..., None]
    p_expert = joint.sum(dim=1, keepdim=True)
    independent = p_modality[..., None] * p_expert
    per_task = (joint * ((joint + eps).log() - (independent + eps).log())).sum(dim=(1, 2))
    return (p_task * per_task).sum()


def conditional_mutual_information(
    probs: Tensor,
    modality_ids: Tensor,
    task_ids: Tensor,
    num_modalities: int,
    num_tasks: int,
    reduce: Reduce | None = all_reduce_sum,
    eps: float = EPS,
) -> Tensor:
    """Conditional MI ``I(M; E | T)`` in nats between modalities and experts given the task
    (M4oE, Wu et al., ICLR 2025; ``= H(M|T) + H(E|T) - H(M,E|T)``)."""
    groups = task_ids.to(modality_ids.device) * num_modalities + modality_ids
    stats = group_statistics(probs, groups, num_tasks * num_modalities)
    if reduce is not None:
        stats = reduce(stats)
    stats = stats.view(num_tasks, num_modalities, -1)
    return conditional_mutual_information_from_statistics(stats, eps)


@AUX_LOSSES.register("mutual_information")
class MutualInformationLoss(RoutingLoss):
    """``L = -sum_layers I(T; E_layer)`` (Mod-Squad, CVPR 2023, eq. 7; its weight is ``w_MI``,
    0.001 in the paper, 0.005 in the code).

    Scores that are not a softmax (``score: sigmoid``) are normalised per token first. Records
    without task ids (a single task) contribute 0.

    Config: ``{type: mutual_information, weight: 0.001, layers: null, num_tasks: null}``
    (``num_tasks`` null: the largest task id seen + 1, agreed over processes).
    """

    def __init__(
        self,
        layers: str | None = None,
        num_tasks: int | None = None,
        reduce: Reduce | None = all_reduce_sum,
    ) -> None:
        super().__init__(layers)
        self.num_tasks, self.reduce = num_tasks, reduce

    def layer_loss(self, record: RoutingRecord) -> Tensor:
        probs = record.routing.probs
        if record.task_ids is None:
            return probs.new_zeros(())
        task_ids = valid_rows(record, record.task_ids)
        probs = renormalize_weight(valid_rows(record, probs).float())
        num_tasks = num_ids(task_ids, self.num_tasks)
        return -mutual_information(probs, task_ids, num_tasks, self.reduce)


@AUX_LOSSES.register("conditional_mutual_information")
class ConditionalMutualInformationLoss(RoutingLoss):
    """``L = -sum_layers I(M; E_layer | T)`` (M4oE, Wu et al., ICLR 2025:
    ``L = sum_t L_t - alpha I``).

    Uses ``record.modality_ids`` (records without them contribute 0) and ``record.task_ids``
    (``None``: one task). Absent-modality tokens are excluded through ``record.valid``.

    Config: ``{type: conditional_mutual_information, weight: 0.01, num_modalities: null,
    num_tasks: null}``.
    """

    def __init__(
        self,
        layers: str | None = None,
        num_modalities: int | None = None,
        num_tasks: int | None = None,
        reduce: Reduce | None = all_reduce_sum,
    ) -> None:
        super().__init__(layers)
        self.num_modalities, self.num_tasks, self.reduce = num_modalities, num_tasks, reduce

    def layer_loss(self, record: RoutingRecord) -> Tensor:
        probs = record.routing.probs
        if record.modality_ids is None:
            return probs.new_zeros(())
        modality_ids = valid_rows(record, record.modality_ids)
        task_ids = valid_rows(record, record.task_ids)
        if task_ids is None:
            task_ids = torch.zeros_like(modality_ids)
        probs = renormalize_weight(valid_rows(record, probs).float())
        return -conditional_mutual_information(
            probs,
            modality_ids,
            task_ids,
            num_ids(modality_ids, self.num_modalities),
            num_ids(task_ids, self.num_tasks),
            self.reduce,
        )
