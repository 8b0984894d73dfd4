"""Top-k routing (Shazeer et al. 2017)."""

from __future__ import annotations

from torch import Tensor

from moekit.registry import ROUTERS
from moekit.routing.base import Router
from moekit.routing.select import check_k, select_top_k


@ROUTERS.register("topk")
class TopKRouter(Router):
    """Top-k routing: ``G(x) = TopK(score(x W_g), k)`` (Shazeer et al., ICLR 2017).

    The weights are the selected scores (Mod-Squad) or, with ``renormalize``, the scores divided
    by their sum (Shazeer's softmax over the kept logits).

    Config: ``{type: topk, k: 2, score: softmax, renormalize: false, bias: false}``.
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
        super().__init__(dim, num_experts, num_tasks, score, renormalize, bias)
        check_k(k, num_experts)
        self.k = k

    def extra_repr(self) -> str:
        return f"k={self.k}, {super().extra_repr()}"

    def select(self, probs: Tensor) -> tuple[Tensor, Tensor]:
        return select_top_k(probs, self.k, self.renormalize)
