"""The routing contract shared by every router, MoE layer, aux loss and analysis tool."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Routing:
    """Which experts each of ``n`` tokens uses, and with which weights.

    Attributes:
        probs: ``[n, E]`` float32 gate scores over *all* experts, before any selection
            (a softmax, or independent sigmoids for ``score: sigmoid``).
        logits: ``[n, E]`` gate logits.
        index: ``[n, K]`` long, the selected experts; ``-1`` marks an empty slot (top-p
            selects a variable number per token).
        weight: ``[n, K]`` combine weights, ``0`` in empty slots.
    """

    probs: Tensor
    logits: Tensor
    index: Tensor
    weight: Tensor

    @property
    def num_experts(self) -> int:
        return self.probs.shape[-1]

    def selected_mask(self) -> Tensor:
        """``[n, E]`` bool: whether token ``i`` selected expert ``e``."""
        n, num_experts = self.probs.shape
        mask = torch.zeros(n, num_experts + 1, dtype=torch.bool, device=self.index.device)
        mask.scatter_(1, self.index % (num_experts + 1), True)  # -1 lands in the spare column
        return mask[:, :num_experts]

    def num_selected(self) -> Tensor:
        """``[n]`` long: how many experts each token selected."""
        return (self.index >= 0).sum(dim=1)

    def dense_weight(self) -> Tensor:
        """``[n, E]`` combine weights scattered over all experts (0 where not selected)."""
        n, num_experts = self.probs.shape
        dense = torch.zeros(n, num_experts + 1, dtype=self.weight.dtype, device=self.weight.device)
        dense.scatter_add_(1, self.index % (num_experts + 1), self.weight)
        return dense[:, :num_experts]


@dataclass
class RoutingRecord:
    """What one MoE layer reports for one forward pass.

    Records travel with the model output (``ModelOutput.routing``); no module accumulates
    them, so nothing leaks between steps. Aux losses and usage statistics are pure
    functions of records.

    Attributes:
        layer: the layer's name (its module path in the model).
        routing: the :class:`Routing` of the layer's tokens.
        task_ids: ``[n]`` long task id of every token, or ``None`` for a single-task layer.
        modality_ids: ``[n]`` long modality id of every token, where there are modalities.
        valid: ``[n]`` bool, tokens that count in statistics (``False`` for padding or an absent
            modality); ``None`` means all tokens count.
        dispatch_mass: ``[n]`` float, for layers whose slots read weighted averages of the
            tokens (Soft MoE): each token's dispatch weight summed over its sequence's slots,
            how much the layer's experts read it (``None`` for token-choice layers, where the
            routing weights say it).
    """

    layer: str
    routing: Routing
    task_ids: Tensor | None = None
    modality_ids: Tensor | None = None
    valid: Tensor | None = None
    dispatch_mass: Tensor | None = None
