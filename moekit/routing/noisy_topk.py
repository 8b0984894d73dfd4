"""Noisy top-k gating (Shazeer et al. 2017; Mod-Squad eq. 2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.registry import ROUTERS
from moekit.routing.gate import Gate
from moekit.routing.topk import TopKRouter


@ROUTERS.register("noisy_topk")
class NoisyTopKRouter(TopKRouter):
    """Noisy top-k: ``G(x) = TopK(score(x W_g + eps * Softplus(x W_noise)), k)``, ``eps ~ N(0,1)``.

    Shazeer et al. (ICLR 2017) and Mod-Squad (CVPR 2023, eq. 2). The noise is added only in
    training mode: evaluation is deterministic (Mod-Squad's code also adds it at evaluation,
    a bug this router does not repeat). ``W_noise`` is a second per-task gate, initialised to
    zero as in Shazeer et al. ``logits`` and ``probs`` of the returned routing are the noisy
    ones, the values the selection was made from.

    Config: ``{type: noisy_topk, k: 4, score: softmax, renormalize: false}`` (Mod-Squad uses
    ``renormalize: false``).
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        k: int = 2,
        num_tasks: int = 1,
        score: str = "softmax",
        renormalize: bool = False,
        bias: bool = False,
    ) -> None:
        super().__init__(dim, num_experts, k, num_tasks, score, renormalize, bias)
        self.noise_gate = Gate(dim, num_experts, num_tasks, bias=bias, init_std=0.0)

    def gate_logits(self, x: Tensor, task_ids: Tensor | None) -> Tensor:
        logits = self.gate(x, task_ids)
        if not self.training:
            return logits
        noise_std = F.softplus(self.noise_gate(x, task_ids))
        return logits + torch.randn_like(logits) * noise_std
