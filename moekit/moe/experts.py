"""Stacked expert parameters: ``E`` linear maps stored as one ``[E, d_in, d_out]`` tensor."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class ExpertLinear(nn.Module):
    """``E`` linear maps ``y = x W_e + b_e`` with ``weight [E, d_in, d_out]``, ``bias [E, d_out]``.

    Each expert is initialised like ``nn.Linear(d_in, d_out)``. The layer holds parameters only;
    :func:`moekit.moe.dispatch.grouped_linear` applies them to rows grouped by expert.
    """

    def __init__(self, num_experts: int, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.num_experts, self.in_features, self.out_features = (
            num_experts,
            in_features,
            out_features,
        )
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(num_experts, out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, in_features={self.in_features}, "
            f"out_features={self.out_features}, bias={self.bias is not None}"
        )

    def keep(self, index: Tensor) -> None:
        """Keep the experts ``index [E']`` (in this order): smaller stacked tensors."""
        self.weight = nn.Parameter(self.weight.detach().index_select(0, index).clone())
        if self.bias is not None:
            self.bias = nn.Parameter(self.bias.detach().index_select(0, index).clone())
        self.num_experts = int(index.numel())

    def expert(self, e: int, x: Tensor) -> Tensor:
        """Expert ``e`` alone on ``x [..., d_in]`` (for references and tests, not dispatch)."""
        y = x @ self.weight[e]
        return y if self.bias is None else y + self.bias[e]
