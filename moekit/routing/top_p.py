"""Top-p (dynamic) routing (Huang et al., ACL 2024)."""

from __future__ import annotations

from torch import Tensor

from moekit.registry import ROUTERS
from moekit.routing.base import Router
from moekit.routing.select import check_top_p, select_top_p


@ROUTERS.register("top_p")
class TopPRouter(Router):
    """Top-p routing: the fewest experts whose cumulative score exceeds ``p``.

    Huang et al., ACL 2024, "Harder Tasks Need More Experts: Dynamic Routing in MoE Models";
    see :func:`moekit.routing.select_top_p` for the exact rule. Harder tokens select more
    experts; ``max_k`` bounds the compute and fixes the number of slots. With
    ``score: sigmoid, p: 0.8, renormalize: true`` this is the IDRiD paper's top-p phase.

    Config: ``{type: top_p, p: 0.4, min_k: 1, max_k: null, score: softmax, renormalize: false}``.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        p: float = 0.4,
        min_k: int = 1,
        max_k: int | None = None,
        num_tasks: int = 1,
        score: str = "softmax",
        renormalize: bool = False,
        bias: bool = False,
    ) -> None:
        super().__init__(dim, num_experts, num_tasks, score, renormalize, bias)
        check_top_p(p, min_k, max_k, num_experts)
        self.p, self.min_k, self.max_k = p, min_k, max_k

    def extra_repr(self) -> str:
        return f"p={self.p}, min_k={self.min_k}, max_k={self.max_k}, {super().extra_repr()}"

    def select(self, probs: Tensor) -> tuple[Tensor, Tensor]:
        return select_top_p(probs, self.p, self.min_k, self.max_k, self.renormalize)
