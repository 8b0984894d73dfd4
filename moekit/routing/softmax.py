"""Dense routing: every expert, weighted by its score."""

from __future__ import annotations

from torch import Tensor

from moekit.registry import ROUTERS
from moekit.routing.base import Router
from moekit.routing.select import select_all


@ROUTERS.register("softmax")
class SoftmaxRouter(Router):
    """Dense routing: ``y = sum_e w_e E_e(x)`` over all ``E`` experts, ``w = probs``.

    ``renormalize`` defaults to true here: with ``score: softmax`` it changes nothing, and with
    ``score: sigmoid`` it gives the IDRiD paper's dense phase, ``w_e = s_e / sum_j s_j``.

    Config: ``{type: softmax, score: softmax|sigmoid, renormalize: true, bias: false}``.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        num_tasks: int = 1,
        score: str = "softmax",
        renormalize: bool = True,
        bias: bool = False,
    ) -> None:
        super().__init__(dim, num_experts, num_tasks, score, renormalize, bias)

    def select(self, probs: Tensor) -> tuple[Tensor, Tensor]:
        return select_all(probs, self.renormalize)
