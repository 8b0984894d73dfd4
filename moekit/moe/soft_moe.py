"""Soft MoE: every slot is a weighted average of all tokens, every token of all slot outputs.

Puigcerver, Riquelme, Mustafa and Houlsby, "From Sparse to Soft Mixtures of Experts", ICLR
2024; the task-slotted form is M4oE's MToE layer (Wu, Shuai, Tang, Wang and Shen, ICLR 2025).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import trunc_normal_
from torch import Tensor, nn

from moekit.errors import ConfigError
from moekit.moe.activations import get_activation
from moekit.moe.base import MoELayer, rows_per_token
from moekit.moe.experts import ExpertLinear
from moekit.registry import MOE_LAYERS
from moekit.routing.gate import Gate
from moekit.routing.types import Routing, RoutingRecord


class SlotRouter(nn.Module):
    """The slot parameters ``Φ_t [dim, E·p]`` of each task and the logits ``L = X Φ_t``.

    ``Φ`` of the ``T`` tasks is stacked in a :class:`~moekit.routing.gate.Gate` (``weight
    [T, dim, E·p]``, LeCun-normal initialisation as in the paper), so per-task extraction
    (:meth:`keep_task`) and router fine-tuning treat it like any per-task gate. With
    ``normalize`` the logits are ``L = s · (X / ‖X‖) (Φ / ‖Φ‖)``: tokens L2-normalised over
    features (rows of ``X``), every slot's column of ``Φ`` L2-normalised, a learnable scalar
    ``s`` (initialised to 1) — Puigcerver et al. §2.3. The normalised tokens are used for the
    logits only; the slots average the tokens as they are.
    """

    def __init__(
        self, dim: int, num_experts: int, slots_per_expert: int, num_tasks: int, normalize: bool
    ) -> None:
        super().__init__()
        self.dim, self.num_experts, self.num_tasks = dim, num_experts, num_tasks
        self.slots_per_expert = slots_per_expert
        self.gate = Gate(dim, num_experts * slots_per_expert, num_tasks, init_std=dim**-0.5)
        self.scale = nn.Parameter(torch.ones(())) if normalize else None

    def extra_repr(self) -> str:
        return f"slots_per_expert={self.slots_per_expert}, normalize={self.scale is not None}"

    def keep_task(self, task: int) -> None:
        """Keep only task ``task``'s slot parameters."""
        self.gate.keep_task(task)
        self.num_tasks = 1

    def forward(self, x: Tensor, task_ids: Tensor | None) -> Tensor:
        """``x [R, N, dim]``, ``task_ids [R]`` (one task per sequence) -> ``[R, N, E·p]``
        float32 logits."""
        with torch.autocast(x.device.type, enabled=False):
            x, phi = x.float(), self.gate.weight.float()
            if self.scale is not None:
                x, phi = F.normalize(x, dim=-1), F.normalize(phi, dim=1)
            logits = x @ phi[0] if self.num_tasks == 1 else torch.bmm(x, phi[task_ids])
            return logits if self.scale is None else logits * self.scale


@MOE_LAYERS.register("soft_moe")
class SoftMoE(MoELayer):
    """Soft MoE (Puigcerver et al., ICLR 2024): ``E`` expert MLPs with ``p`` slots each.

    For a sequence of tokens ``X [m, d]`` and logits ``L = X Φ [m, E·p]``
    (:class:`SlotRouter`):

    - dispatch ``D = softmax over tokens`` (each column of ``L``); slot inputs
      ``X̃ = Dᵀ X [E·p, d]``, so every slot is a weighted average of all tokens;
    - expert ``i`` processes its ``p`` slots: ``Ỹ_{i,j} = MLP_i(X̃_{i,j})``;
    - combine ``C = softmax over slots`` (each row of ``L``); output ``Y = C Ỹ [m, d]``.

    Masked tokens (``valid == False``: an absent modality, padding) take no part: their
    logits are ``-inf`` before the dispatch softmax (no slot averages them), their output is 0
    and their values are never read (they are zeroed first, so neither a NaN filler nor the
    gradient reaches them). A sequence without valid tokens gives zero slot inputs.

    **Task-slotted form** (M4oE's MToE, ``num_tasks = T > 1``): slots are grouped per task —
    task ``t`` has its own slot parameters ``Φ_t`` (``E·p`` slots over the shared experts) —
    and a learned task embedding ``e_t`` is added to the task's slot inputs,
    ``X̃_t = D_tᵀ X + e_t``; combine is the softmax within the task's slots, so each task gets
    its own output ``Y_t = C_t Ỹ_t``. Each input sequence is one (sample, task) row with its
    task id (``task_ids [R]``): a model runs every sample's tokens once per task it needs, and
    the row computes exactly task ``t``'s output. Per-task extraction (:meth:`keep_task`)
    keeps ``Φ_t`` and ``e_t``; the row's output is unchanged.

    **Routing record.** Soft MoE has no per-token selection; the per-token "routing to
    expert ``e``" that usage statistics and the mutual-information losses read is the token's
    **combine mass** over expert ``e``'s slots, ``probs[x, e] = Σ_{j ∈ slots(e)} C[x, j]``:
    the share of the token's output that expert ``e`` produced (``y_x = Σ_e Σ_j C[x, j]
    Ỹ_j``), exactly the role a token-choice router's weights play, and a distribution over
    experts (rows sum to 1). The dispatch mass is not: a column of ``D`` sums to 1 over the
    *tokens*, so a token's dispatch row measures how much the slots average it, not where its
    output comes from. ``logits[x, e] = logsumexp_{j ∈ slots(e)} L[x, j]`` (so ``probs =
    softmax(logits)``); ``index`` lists every expert the layer holds and ``weight`` their
    ``probs`` (``-1``/``0`` for masked tokens, which ``valid`` also excludes from statistics).
    The record's ``dispatch_mass`` is the other direction, how much the slots read each token,
    ``Σ_j D[x, j]`` over the held experts' slots (a sequence's masses sum to its slot count;
    0 for masked tokens): a modality's share of it is the share of the layer's (a task's)
    slot inputs drawn from that modality's tokens (modality utilisation).

    Per-expert extraction (:meth:`keep_experts`) keeps ``Φ`` whole, as an extracted token-choice
    layer keeps its router: the combine softmax still runs over every slot and the removed
    experts' slots contribute nothing.

    Experts run as one batched matmul per projection (every expert has the same number of
    slots): cost ``R·E·p·(2·d·H)`` for ``R`` sequences, plus ``3·R·m·E·p·d`` for the logits,
    dispatch and combine.

    Args:
        dim: token size ``d``.
        hidden: hidden size ``H`` of each expert MLP.
        num_experts: ``E``.
        slots_per_expert: ``p``.
        num_tasks: ``T``; ``> 1`` gives the task-slotted form.
        normalize: L2-normalise tokens and slot parameters for the logits, with a learnable
            scale.
        task_embedding: add ``e_t`` to task ``t``'s slot inputs (task-slotted form only).
        activation: ``gelu``, ``gelu_tanh``, ``relu`` or ``silu``.
        bias: expert biases.
    """

    expert_modules = ("fc1", "fc2")

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_experts: int,
        slots_per_expert: int = 1,
        num_tasks: int = 1,
        normalize: bool = True,
        task_embedding: bool = True,
        activation: str = "gelu",
        bias: bool = True,
    ) -> None:
        for key, value in (("num_experts", num_experts), ("slots_per_expert", slots_per_expert)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"soft_moe.{key}: expected a positive int, got {value!r}")
        # MoELayer.__init__ builds a token-choice router from a config; a Soft MoE layer's
        # routing is its slot parameters, so it sets the attributes MoELayer keeps itself.
        nn.Module.__init__(self)
        self.dim, self.num_experts, self.num_tasks = dim, num_experts, num_tasks
        self.hidden, self.slots_per_expert = hidden, slots_per_expert
        self.router = SlotRouter(dim, num_experts, slots_per_expert, num_tasks, normalize)
        self.router_config = {
            "type": "soft_moe",
            "slots_per_expert": slots_per_expert,
            "normalize": normalize,
        }
        self.name = type(self).__name__
        self.register_buffer("expert_map", None, persistent=False)
        self.task_embed = (
            nn.Parameter(torch.zeros(num_tasks, dim)) if task_embedding and num_tasks > 1 else None
        )
        if self.task_embed is not None:
            trunc_normal_(self.task_embed, std=0.02)
        self.activation = activation
        self.act = get_activation(activation)
        self.fc1 = ExpertLinear(num_experts, dim, hidden, bias)
        self.fc2 = ExpertLinear(num_experts, hidden, dim, bias)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_tasks={self.num_tasks}, activation={self.activation}"

    def set_router(self, cfg: Mapping[str, Any]) -> None:
        raise ConfigError(
            f"{self.name}: a Soft MoE layer routes through its slots and has no selection rule "
            "to switch; restrict the routing schedule's 'layers' to token-choice MoE layers"
        )

    def keep_task(self, task: int) -> None:
        """Keep only task ``task``'s slot parameters and task embedding."""
        super().keep_task(task)
        if self.task_embed is not None:
            self.task_embed = nn.Parameter(self.task_embed.detach()[task : task + 1].clone())

    def held_slots(self) -> Tensor | None:
        """Columns of the logits that belong to the experts the layer holds (``None``: all)."""
        if self.expert_map is None:
            return None
        held = torch.tensor(self.expert_ids, device=self.expert_map.device)
        offsets = torch.arange(self.slots_per_expert, device=held.device)
        return (held[:, None] * self.slots_per_expert + offsets).flatten()

    def weights(
        self, x: Tensor, task_ids: Tensor | None = None, valid: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(logits, dispatch, combine)``, each ``[R, N, E·p]`` float32, for sequences
        ``x [R, N, dim]`` (masked tokens already zeroed), ``task_ids [R]`` and ``valid
        [R, N]``: ``dispatch`` sums to 1 over the valid tokens of each slot (0 on masked
        tokens), ``combine`` to 1 over the slots of each token (of the token's task)."""
        logits = self.router(x, task_ids)
        combine = logits.softmax(dim=-1)
        if valid is None:
            return logits, logits.softmax(dim=1), combine
        masked = ~valid.unsqueeze(-1)
        dispatch = logits.masked_fill(masked, torch.finfo(logits.dtype).min).softmax(dim=1)
        return logits, dispatch.masked_fill(masked, 0.0), combine

    def run_experts(self, slot_inputs: Tensor) -> Tensor:
        """Expert ``i`` on its ``p`` slots of every sequence: ``[R, E'·p, d] -> [R, E'·p, d]``
        (one batched matmul per projection over the held experts)."""
        p = self.slots_per_expert
        h = rearrange(slot_inputs, "r (e p) c -> e (r p) c", p=p)
        h = torch.bmm(h, self.fc1.weight.to(h.dtype))
        if self.fc1.bias is not None:
            h = h + self.fc1.bias.unsqueeze(1).to(h.dtype)
        out = torch.bmm(self.act(h), self.fc2.weight.to(h.dtype))
        if self.fc2.bias is not None:
            out = out + self.fc2.bias.unsqueeze(1).to(h.dtype)
        return rearrange(out, "e (r p) c -> r (e p) c", r=slot_inputs.shape[0], p=p)

    def sequence_tasks(self, task_ids: Tensor | None, rows: int) -> Tensor | None:
        """``task_ids`` as one id per sequence ``[R]`` (required when ``num_tasks > 1``)."""
        if task_ids is None:
            if self.num_tasks > 1:
                raise ValueError(
                    f"{self.name}: a task-slotted Soft MoE layer (num_tasks={self.num_tasks}) "
                    "needs task_ids, one per sequence"
                )
            return None
        task_ids = task_ids.reshape(-1)
        if task_ids.numel() != rows:
            raise ValueError(
                f"{self.name}: task_ids has {task_ids.numel()} entries; a Soft MoE layer routes "
                f"whole sequences and expects one task id per sequence ({rows})"
            )
        return task_ids

    def record(
        self,
        logits: Tensor,
        combine: Tensor,
        task_ids: Tensor | None,
        modality_ids: Tensor | None,
        valid: Tensor | None,
    ) -> RoutingRecord:
        """The per-token record: combine mass per expert (see the class docstring)."""
        rows, length, _ = logits.shape
        per_expert = (rows * length, self.router.num_experts, self.slots_per_expert)
        probs = combine.reshape(per_expert).sum(dim=-1)
        expert_logits = logits.reshape(per_expert).logsumexp(dim=-1)
        held = torch.tensor(self.expert_ids, device=probs.device)
        index = held.expand(rows * length, -1)
        weight = probs.index_select(1, held)
        flat_valid = None if valid is None else valid.reshape(-1)
        if flat_valid is not None:
            index = index.masked_fill(~flat_valid[:, None], -1)
            weight = weight.masked_fill(~flat_valid[:, None], 0.0)
        return RoutingRecord(
            self.name,
            Routing(probs, expert_logits, index, weight),
            task_ids=None if task_ids is None else task_ids.repeat_interleave(length),
            modality_ids=rows_per_token(modality_ids, rows, length, "modality_ids"),
            valid=flat_valid,
        )

    def forward(
        self,
        x: Tensor,
        task_ids: Tensor | None = None,
        *,
        modality_ids: Tensor | None = None,
        valid: Tensor | None = None,
    ) -> tuple[Tensor, RoutingRecord]:
        """Sequences ``x [R, N, C]`` (or ``[n, C]``: one sequence), ``task_ids [R]`` (one per
        sequence), ``modality_ids`` per sequence or per token, ``valid`` per token -> ``(y,
        record)``."""
        seq = x if x.dim() == 3 else x.unsqueeze(0)
        rows, length, _ = seq.shape
        task_ids = self.sequence_tasks(task_ids, rows)
        if valid is not None:
            valid = valid.reshape(rows, length).to(device=seq.device, dtype=torch.bool)
            seq = seq.masked_fill(~valid.unsqueeze(-1), 0.0)
        logits, dispatch, combine = self.weights(seq, task_ids, valid)
        record = self.record(logits, combine, task_ids, modality_ids, valid)
        if valid is not None:
            combine = combine.masked_fill(~valid.unsqueeze(-1), 0.0)
        slots = self.held_slots()
        if slots is not None:
            dispatch, combine = dispatch.index_select(2, slots), combine.index_select(2, slots)
        record.dispatch_mass = dispatch.sum(dim=-1).reshape(-1)
        slot_inputs = torch.bmm(dispatch.transpose(1, 2).to(seq.dtype), seq)
        if self.task_embed is not None:
            embed = self.task_embed[0] if task_ids is None else self.task_embed[task_ids]
            slot_inputs = slot_inputs + embed.view(-1, 1, self.dim).to(seq.dtype)
        y = torch.bmm(combine.to(seq.dtype), self.run_experts(slot_inputs))
        return y.view_as(x), record
