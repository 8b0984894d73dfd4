"""Pure selection rules: probabilities ``[n, E]`` -> selected experts and combine weights.

Every rule returns ``(index [n, K] long, weight [n, K])`` where ``-1`` in ``index`` marks an
empty slot (weight ``0``). Slots are ordered by decreasing probability, and the selected
experts of a token always form a prefix of its slots.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.errors import ConfigError


def renormalize_weight(weight: Tensor) -> Tensor:
    """Scale each row of ``weight`` to sum to 1 (rows summing to 0 stay 0)."""
    total = weight.sum(dim=-1, keepdim=True)
    return weight / total.clamp_min(torch.finfo(weight.dtype).tiny)


def mass_tolerance(probs: Tensor) -> float:
    """``E · eps``: the rounding error a cumulative sum of ``E`` probabilities can carry."""
    return probs.shape[-1] * torch.finfo(probs.dtype).eps


def k_problem(k: int, num_experts: int, name: str = "k") -> str | None:
    """What is wrong with ``k`` (``1 <= k <= num_experts`` is expected), or None."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_experts:
        return f"{name} must be an int in [1, {num_experts}] (num_experts), got {k!r}"
    return None


def top_p_problem(p: float, min_k: int, max_k: int | None, num_experts: int) -> str | None:
    """What is wrong with top-p's arguments (``0 < p <= 1``, ``1 <= min_k <= max_k <= E``)."""
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 < p <= 1.0:
        return f"p must be a number in (0, 1], got {p!r}"
    problem = k_problem(min_k, num_experts, "min_k")
    if problem is None and max_k is not None:
        problem = k_problem(max_k, num_experts, "max_k")
        if problem is None and max_k < min_k:
            problem = f"max_k ({max_k}) must be >= min_k ({min_k})"
    return problem


def check_k(k: int, num_experts: int) -> None:
    """A router's ``k`` (at construction): a :class:`ConfigError` unless ``1 <= k <= E``."""
    problem = k_problem(k, num_experts)
    if problem:
        raise ConfigError(problem)


def check_top_p(p: float, min_k: int, max_k: int | None, num_experts: int) -> None:
    """A top-p router's arguments (at construction): a :class:`ConfigError` when wrong."""
    problem = top_p_problem(p, min_k, max_k, num_experts)
    if problem:
        raise ConfigError(problem)


def select_all(probs: Tensor, renormalize: bool = False) -> tuple[Tensor, Tensor]:
    """Dense routing: every expert, weight = its probability (``renormalize``: / row sum)."""
    n, num_experts = probs.shape
    index = torch.arange(num_experts, device=probs.device).expand(n, num_experts)
    return index, renormalize_weight(probs) if renormalize else probs


def select_top_k(probs: Tensor, k: int, renormalize: bool = False) -> tuple[Tensor, Tensor]:
    """Top-k routing (Shazeer et al. 2017): the ``k`` most probable experts of each token.

    ``weight`` holds the selected probabilities as they are (Mod-Squad, CVPR 2023) or, with
    ``renormalize``, divided by their sum, which equals Shazeer's softmax over the kept logits
    when ``probs`` is a softmax.
    """
    problem = k_problem(k, probs.shape[-1])
    if problem:
        raise ValueError(f"select_top_k: {problem}")
    weight, index = probs.topk(k, dim=-1)
    return index, renormalize_weight(weight) if renormalize else weight


def select_top_p(
    probs: Tensor,
    p: float,
    min_k: int = 1,
    max_k: int | None = None,
    renormalize: bool = False,
) -> tuple[Tensor, Tensor]:
    """Top-p ("dynamic") routing (Huang et al., ACL 2024, "Harder Tasks Need More Experts").

    Sort each token's probabilities in decreasing order and keep the smallest prefix whose
    cumulative mass exceeds ``p``: expert ``j`` (in sorted order) is kept iff
    ``sum_{i<j} P_(i) <= p``. The expert that crosses ``p`` is kept and the top-1 is always
    kept, so ``k = 1`` exactly when ``P_max > p``, and uniform probabilities over ``E`` experts
    give ``k = floor(p E) + 1``. The comparison allows for the rounding of the cumulative sum
    (:func:`mass_tolerance`), so that an exact boundary such as ``p E`` an integer follows the
    rule rather than the rounding. If the row's total mass never exceeds ``p`` (possible with
    independent sigmoid scores) every expert is kept. ``min_k`` and ``max_k`` then bound ``k``.

    The number of slots ``K`` is ``max_k`` when given (a static shape), else the largest ``k``
    in the batch (one host synchronisation). Weights are the selected probabilities (the
    paper) or, with ``renormalize``, divided by their sum.
    """
    num_experts = probs.shape[-1]
    problem = top_p_problem(p, min_k, max_k, num_experts)
    if problem:
        raise ValueError(f"select_top_p: {problem}")
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = torch.nn.functional.pad(sorted_probs.cumsum(dim=-1)[:, :-1], (1, 0))
    rank = torch.arange(num_experts, device=probs.device)
    keep = (mass_before <= p + mass_tolerance(probs)) | (rank < min_k)
    if max_k is not None:
        keep &= rank < max_k
        slots = max_k
    else:
        slots = int(keep.sum(dim=-1).max()) if probs.shape[0] else min_k
    keep = keep[:, :slots]
    index = torch.where(keep, order[:, :slots], -1)
    weight = torch.where(keep, sorted_probs[:, :slots], 0.0)
    return index, renormalize_weight(weight) if renormalize else weight
