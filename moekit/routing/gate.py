"""The gate: a per-task linear map from token features to expert logits.

A task-conditioned router (Mod-Squad, CVPR 2023, §3.2) holds one gate ``W_g^i`` per task. The
``T`` gates are stacked in one parameter ``weight [T, dim, E]`` so that a batch mixing tasks is
gated with one matmul: every token is projected by all ``T`` gates at once (``[n, T*E]``, cheap
since ``E`` is small) and keeps the row of its own task. Gates of tasks absent from a batch get
zero gradient rather than none, so data parallelism never sees an unused gate parameter.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from moekit.errors import ConfigError


class Gate(nn.Module):
    """``logits = x W[task] (+ b[task])``, computed in float32 (outside autocast).

    Args:
        dim: token feature size.
        num_experts: number of experts ``E``.
        num_tasks: number of stacked per-task gates ``T``.
        bias: add a per-task bias (the IDRiD paper's ``nn.Linear`` gate has one; Shazeer's
            and Mod-Squad's ``W_g`` do not).
        init_std: standard deviation of the normal initialisation of ``weight``; ``0`` gives
            the all-zero initialisation of Shazeer et al. (2017).
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        num_tasks: int = 1,
        bias: bool = False,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if num_tasks < 1:
            raise ConfigError(f"num_tasks must be >= 1, got {num_tasks}")
        self.dim, self.num_experts, self.num_tasks = dim, num_experts, num_tasks
        self.weight = nn.Parameter(torch.empty(num_tasks, dim, num_experts))
        self.bias = nn.Parameter(torch.zeros(num_tasks, num_experts)) if bias else None
        nn.init.normal_(self.weight, std=init_std)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_experts={self.num_experts}, num_tasks={self.num_tasks}, "
            f"bias={self.bias is not None}"
        )

    def keep_task(self, task: int) -> None:
        """Keep only task ``task``'s gate (per-task extraction): ``num_tasks`` becomes 1."""
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"task id {task} is outside 0..{self.num_tasks - 1}")
        self.weight = nn.Parameter(self.weight.detach()[task : task + 1].clone())
        if self.bias is not None:
            self.bias = nn.Parameter(self.bias.detach()[task : task + 1].clone())
        self.num_tasks = 1

    def forward(self, x: Tensor, task_ids: Tensor | None = None) -> Tensor:
        """``x [n, dim]``, ``task_ids [n]`` (required when ``num_tasks > 1``) -> ``[n, E]``."""
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            if self.num_tasks == 1:
                logits = x @ self.weight[0]
                return logits if self.bias is None else logits + self.bias[0]
            if task_ids is None:
                raise ValueError(
                    f"a gate with num_tasks={self.num_tasks} needs task_ids for every token"
                )
            logits = x @ rearrange(self.weight, "t d e -> d (t e)")
            if self.bias is not None:
                logits = logits + rearrange(self.bias, "t e -> (t e)")
            logits = rearrange(logits, "n (t e) -> n t e", t=self.num_tasks)
            pick = task_ids.view(-1, 1, 1).expand(-1, 1, self.num_experts)
            return logits.gather(1, pick).squeeze(1)
