"""The base class of every router: gate -> score -> selection rule -> :class:`Routing`.

A router maps tokens ``x [n, dim]`` (and their task ids) to a :class:`Routing`: gate logits,
scores over all experts (``probs``, float32) and the selected experts with their combine
weights. Routers keep no state between calls and compute no loss. Subclasses implement only
:meth:`Router.select` (and, for noisy routing, :meth:`Router.gate_logits`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from moekit.errors import ConfigError, did_you_mean
from moekit.routing.gate import Gate
from moekit.routing.types import Routing

SCORES: dict[str, Callable[[Tensor], Tensor]] = {
    "softmax": lambda logits: logits.softmax(dim=-1),
    "sigmoid": torch.sigmoid,
}


class Router(nn.Module):
    """Gate ``logits = x W_g[task]``, scores ``probs = score(logits)``, selection, all in float32.

    Args:
        dim: token feature size.
        num_experts: number of experts ``E``.
        num_tasks: one gate per task (Mod-Squad's task-specific routers); each token is routed
            by the gate of its own task, so one call may mix tasks.
        score: ``softmax`` (a distribution over experts) or ``sigmoid`` (an independent score
            per expert, as in the IDRiD paper's gate); ``probs`` holds these scores.
        renormalize: divide the selected weights by their sum.
        bias: give the gate a per-task bias.

    Attributes:
        gate: the :class:`Gate` (its parameters are handed to a new router on phase switches).
        noise_gate: the noise gate of noisy top-k routing, or ``None``.
    """

    noise_gate: Gate | None

    def __init__(
        self,
        dim: int,
        num_experts: int,
        num_tasks: int = 1,
        score: str = "softmax",
        renormalize: bool = False,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if score not in SCORES:
            raise ConfigError(
                f"router score '{score}' is unknown; valid: {', '.join(SCORES)}"
                f"{did_you_mean(str(score), SCORES)}"
            )
        if num_experts < 1:
            raise ConfigError(f"num_experts must be >= 1, got {num_experts}")
        self.dim, self.num_experts, self.num_tasks = dim, num_experts, num_tasks
        self.score, self.renormalize = score, renormalize
        self.gate = Gate(dim, num_experts, num_tasks, bias=bias)
        self.noise_gate = None

    def extra_repr(self) -> str:
        return f"score={self.score}, renormalize={self.renormalize}"

    def gate_logits(self, x: Tensor, task_ids: Tensor | None) -> Tensor:
        """The logits the scores are computed from (noisy routers add noise here)."""
        return self.gate(x, task_ids)

    def select(self, probs: Tensor) -> tuple[Tensor, Tensor]:
        """The selection rule: ``probs [n, E]`` -> ``(index [n, K], weight [n, K])``."""
        raise NotImplementedError

    def forward(self, x: Tensor, task_ids: Tensor | None = None) -> Routing:
        """Route tokens ``x [n, dim]`` with task ids ``[n]`` (or ``None``: task 0).

        Everything is computed in float32 with autocast disabled, whatever the dtype of ``x``:
        logits, scores, the selection and the combine weights, so a bf16 or fp16 run selects
        the experts a float32 run would (up to the rounding of ``x`` itself).
        """
        with torch.autocast(x.device.type, enabled=False):
            logits = self.gate_logits(x, task_ids).float()
            probs = SCORES[self.score](logits)
            index, weight = self.select(probs)
        return Routing(probs=probs, logits=logits, index=index, weight=weight)

    def keep_task(self, task: int) -> None:
        """Keep only task ``task``'s gate (and noise gate): the router serves one task."""
        self.gate.keep_task(task)
        if self.noise_gate is not None:
            self.noise_gate.keep_task(task)
        self.num_tasks = 1

    def adopt(self, old: Router) -> None:
        """Take over ``old``'s gate (and noise gate) parameter objects.

        Used when a phase schedule switches the selection rule: the optimizer holds the gate
        parameters, so they must stay the very same objects. A router that adds no noise still
        carries a previous noise gate (unused), so the state-dict keys are the same in every
        phase and a later switch back to noisy routing finds it.
        """
        old_shape = (old.dim, old.num_experts, old.num_tasks)
        shape = (self.dim, self.num_experts, self.num_tasks)
        if old_shape != shape:
            raise ValueError(
                "cannot switch routers of different shapes: "
                f"(dim, num_experts, num_tasks) {old_shape} -> {shape}"
            )
        if (old.gate.bias is None) != (self.gate.bias is None):
            raise ConfigError(
                f"cannot switch the gate bias from {old.gate.bias is not None} to "
                f"{self.gate.bias is not None}: the gate parameters are kept"
            )
        if self.noise_gate is not None and old.noise_gate is None:
            raise ConfigError(
                f"cannot switch from '{type(old).__name__}' to a noisy router: the previous "
                "router has no noise gate whose parameters the optimizer knows"
            )
        self.gate = old.gate
        self.noise_gate = old.noise_gate
