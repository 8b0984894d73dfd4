"""Sparse dispatch: sort (token, expert, weight) triples by expert, run each expert once on its
contiguous group, scale by the combine weight and ``index_add_`` back.

:class:`DispatchPlan` holds the sorted triples of one routing. A :class:`Strategy` applies
stacked expert weights ``[E, d_in, d_out]`` to the grouped rows; the strategies sit side by side
in :data:`STRATEGIES` and are chosen by name:

- ``grouped_mm``: one :func:`torch.nn.functional.grouped_mm` call per projection over all pairs
  (needs 16-byte aligned rows: ``d_in`` and ``d_out`` multiples of 4 in float32, of 8 in
  bfloat16), gathered inputs, ``index_add_`` combine; plain autograd.
- ``loop``: custom autograd functions looping over the experts, writing each expert's block
  into slices of preallocated buffers (no ``cat``, no stacking of per-expert weight
  gradients); its expert MLP runs gather, both projections, scaling and ``index_add_`` block by
  block while the block is in cache, and keeps only ``h`` and ``act(h)`` for backward. On a
  CPU with ``T > 1`` threads and at least ``2T`` expert blocks, the blocks run side by side on
  ``T`` single-threaded workers (:mod:`moekit.moe.expert_threads`) instead of one after the
  other with ``T`` threads per op.

:data:`DEFAULT_STRATEGY` holds the faster one per device, as measured by ``moekit bench moe``.
Unselected experts cost nothing: compute scales with the number of (token, expert) pairs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.errors import ConfigError, did_you_mean
from moekit.moe.activations import Activation
from moekit.moe.expert_threads import num_workers, run_blocks

Result = TypeVar("Result")


def check_capacity_factor(capacity_factor: float | None) -> None:
    """Raise :class:`ConfigError` unless ``capacity_factor`` is ``None`` (dropless) or > 0."""
    if capacity_factor is not None and not (
        isinstance(capacity_factor, int | float) and capacity_factor > 0
    ):
        raise ConfigError(
            f"capacity_factor must be > 0 (or null: dropless), got {capacity_factor!r}"
        )


@dataclass
class DispatchPlan:
    """The (token, expert, weight) triples of one routing, sorted by expert.

    Attributes:
        token: ``[P]`` long, the row of the layer input each pair reads.
        expert: ``[P]`` long, the expert of each pair (non-decreasing).
        weight: ``[P]`` the combine weight of each pair.
        slot: ``[P]`` long, the pair's flat position ``row * K + slot`` in the routing.
        sizes: the number of pairs of each expert (host ints, ``len == E``).
        num_rows: the number of rows ``n`` of the routed input.
    """

    token: Tensor
    expert: Tensor
    weight: Tensor
    slot: Tensor
    sizes: list[int]
    num_rows: int

    @classmethod
    def from_routing(
        cls,
        index: Tensor,
        weight: Tensor,
        num_experts: int,
        capacity_factor: float | None = None,
    ) -> DispatchPlan:
        """Sort the selected pairs of ``index [n, K]`` (``-1`` = empty) by expert.

        Dropless by default. With ``capacity_factor`` each expert takes at most
        ``ceil(capacity_factor * P / E)`` pairs (``P`` selected pairs), first come in token
        order (Switch Transformer, Fedus et al. 2022); the dropped pairs contribute nothing.
        """
        num_rows, num_slots = index.shape
        flat = index.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat + 1, minlength=num_experts + 1)
        empty, *sizes = counts.tolist()
        order = order[empty:]
        expert = flat[order]
        if capacity_factor is not None:
            check_capacity_factor(capacity_factor)
            capacity = math.ceil(capacity_factor * len(order) / num_experts)
            starts = torch.tensor([0, *sizes[:-1]], device=index.device).cumsum(0)
            rank = torch.arange(len(order), device=index.device) - starts[expert]
            kept = rank < capacity
            order, expert = order[kept], expert[kept]
            sizes = [min(size, capacity) for size in sizes]
        return cls(
            token=order // num_slots,
            expert=expert,
            weight=weight.reshape(-1)[order],
            slot=order,
            sizes=sizes,
            num_rows=num_rows,
        )

    @property
    def num_pairs(self) -> int:
        return int(self.token.numel())

    def offsets(self) -> Tensor:
        """``[E]`` int32 cumulative group ends, the ``offs`` of ``grouped_mm``."""
        return torch.tensor(self.sizes, device=self.token.device).cumsum(0).to(torch.int32)

    def groups(self) -> Iterator[tuple[int, slice]]:
        """``(expert, rows)`` for every expert with at least one pair."""
        start = 0
        for e, size in enumerate(self.sizes):
            if size:
                yield e, slice(start, start + size)
            start += size

    def run_groups(
        self, fn: Callable[[list[tuple[int, slice]]], Result], device: torch.device
    ) -> list[Result]:
        """``fn`` over the non-empty groups (:meth:`groups`): ``[fn(groups)]``, or on a
        multi-core CPU one result per worker, each from its share of the groups
        (:func:`moekit.moe.expert_threads.run_blocks`)."""
        groups = list(self.groups())
        sizes = [rows.stop - rows.start for _, rows in groups]
        return run_blocks(fn, groups, sizes, num_workers(device, len(groups)))

    def gather(self, x: Tensor) -> Tensor:
        """The input row of every pair: ``x [n, ...] -> [P, ...]``."""
        return x.index_select(0, self.token)

    def combine(self, y: Tensor) -> Tensor:
        """``out[i] = sum over pairs p of row i: weight_p * y_p``: ``[P, ...] -> [n, ...]``.

        Weighted and summed in float32 (at least), returned in ``y``'s dtype.
        """
        acc = accumulation_dtype(y.dtype)
        weight = self.weight.to(acc).view(-1, *([1] * (y.dim() - 1)))
        out = y.new_zeros(self.num_rows, *y.shape[1:], dtype=acc)
        return out.index_add_(0, self.token, y.to(acc) * weight).to(y.dtype)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums of expert outputs are accumulated in: float32 for bf16/fp16 rows."""
    return torch.promote_types(dtype, torch.float32)


class _LoopGroupedLinear(torch.autograd.Function):
    """``y_g = x_g W_e (+ b_e)`` over contiguous groups, looped with ``out=`` slices.

    Forward and backward write each expert's block straight into one preallocated buffer,
    so there is no ``cat`` of outputs and no stacking of per-expert weight gradients. Blocks
    run side by side on the CPU when :func:`~moekit.moe.expert_threads.num_workers` says so.
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, plan: DispatchPlan
    ) -> Tensor:
        out = x.new_empty(x.shape[0], weight.shape[-1])

        def run(groups: list[tuple[int, slice]]) -> None:
            for e, rows in groups:
                _addmm(x[rows], weight[e], None if bias is None else bias[e], out=out[rows])

        plan.run_groups(run, x.device)
        ctx.save_for_backward(x, weight)
        ctx.plan = plan
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        plan = ctx.plan
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad = grad.contiguous()
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = _zero_unused(torch.empty_like(weight), plan) if need_w else None
        grad_b = _zero_unused(grad.new_empty(weight.shape[::2]), plan) if need_b else None

        def run(groups: list[tuple[int, slice]]) -> None:
            for e, rows in groups:
                if grad_x is not None:
                    torch.mm(grad[rows], weight[e].t(), out=grad_x[rows])
                if grad_w is not None:
                    torch.mm(x[rows].t(), grad[rows], out=grad_w[e])
                if grad_b is not None:
                    torch.sum(grad[rows], dim=0, out=grad_b[e])

        plan.run_groups(run, x.device)
        return grad_x, grad_w, grad_b, None


class _LoopExpertMLP(torch.autograd.Function):
    """The whole expert MLP, one expert block at a time.

    For each expert ``e`` with pair rows ``R_e``: gather ``x[R_e]``, ``h = x W1_e + b1_e``,
    ``o = act(h) W2_e + b2_e``, scale by the pair weights and ``index_add_`` into ``y``. Each
    block's intermediates stay in cache; only ``h`` and ``act(h)`` are kept for backward (as a
    dense MLP keeps them), and no ``[pairs, dim]`` gathered input or output is materialised:
    backward gathers the input rows again. On a multi-core CPU the blocks run side by side on
    single-threaded workers (:mod:`moekit.moe.expert_threads`), each summing into its own
    ``y`` (and input gradient), added up at the end.

    The blocks compute in ``dtype`` (bf16 under autocast): each block casts its expert's
    weights and input rows as it needs them, and writes its weight gradients into float32
    (the weights' dtype) buffers, so no whole-layer cast of the ``[E, d_in, d_out]`` weights or
    of their gradients is made. ``y`` and the input gradient sum the pairs of a row in float32
    (:func:`accumulation_dtype`), the combine weights stay float32, and ``y`` is returned in
    ``dtype``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        w1: Tensor,
        b1: Tensor | None,
        w2: Tensor,
        b2: Tensor | None,
        scale: Tensor,
        act: Activation,
        plan: DispatchPlan,
        dtype: torch.dtype,
    ) -> Tensor:
        h = x.new_empty(plan.num_pairs, w1.shape[-1], dtype=dtype)
        a = torch.empty_like(h)

        def run(groups: list[tuple[int, slice]]) -> Tensor:
            y = x.new_zeros(plan.num_rows, w2.shape[-1], dtype=accumulation_dtype(dtype))
            for e, rows in groups:
                token = plan.token[rows]
                rows_in = x.index_select(0, token).to(dtype)
                _addmm(rows_in, _expert(w1, e, dtype), _expert(b1, e, dtype), out=h[rows])
                a[rows] = act(h[rows])
                out = _addmm(a[rows], _expert(w2, e, dtype), _expert(b2, e, dtype))
                y.index_add_(0, token, out.to(y.dtype).mul_(scale[rows, None]))
            return y

        y = _sum(plan.run_groups(run, x.device))
        ctx.save_for_backward(x, w1, b1, w2, b2, scale, h, a)
        ctx.act, ctx.plan = act, plan
        return y.to(dtype)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        x, w1, b1, w2, b2, scale, h, a = ctx.saved_tensors
        act, plan = ctx.act, ctx.plan
        dtype = h.dtype
        need_x, need_w1, need_b1, need_w2, need_b2, need_scale = ctx.needs_input_grad[:6]
        grad_w1 = _zero_unused(torch.empty_like(w1), plan) if need_w1 else None
        grad_b1 = _zero_unused(torch.empty_like(b1), plan) if need_b1 and b1 is not None else None
        grad_w2 = _zero_unused(torch.empty_like(w2), plan) if need_w2 else None
        grad_b2 = _zero_unused(torch.empty_like(b2), plan) if need_b2 and b2 is not None else None
        grad_scale = torch.empty_like(scale) if need_scale else None  # every pair's row is set
        grad_y = grad_y.to(dtype).contiguous()

        def run(groups: list[tuple[int, slice]]) -> Tensor | None:
            grad_x = torch.zeros_like(x, dtype=accumulation_dtype(x.dtype)) if need_x else None
            for e, rows in groups:
                token = plan.token[rows]
                w2_e = _expert(w2, e, dtype)
                g = grad_y.index_select(0, token)
                grad_a = g @ w2_e.t()
                if grad_scale is not None:
                    grad_scale[rows] = torch.linalg.vecdot(grad_a, a[rows])
                    if b2 is not None:
                        grad_scale[rows] += g @ _expert(b2, e, dtype)
                g.mul_(scale[rows, None])
                if grad_w2 is not None:
                    _mm_into(grad_w2[e], a[rows].t(), g)
                if grad_b2 is not None:
                    torch.sum(g, dim=0, dtype=grad_b2.dtype, out=grad_b2[e])
                grad_h = act.backward(grad_a.mul_(scale[rows, None]), h[rows])
                if grad_w1 is not None:
                    _mm_into(grad_w1[e], x.index_select(0, token).to(dtype).t(), grad_h)
                if grad_b1 is not None:
                    torch.sum(grad_h, dim=0, dtype=grad_b1.dtype, out=grad_b1[e])
                if grad_x is not None:
                    grad_in = grad_h @ _expert(w1, e, dtype).t()
                    grad_x.index_add_(0, token, grad_in.to(grad_x.dtype))
            return grad_x

        parts = plan.run_groups(run, x.device)
        grad_x = _sum(parts).to(x.dtype) if need_x else None
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, grad_scale, None, None, None


def _zero_unused(grad: Tensor, plan: DispatchPlan) -> Tensor:
    """Zero the slices ``grad[e]`` of the experts without pairs in an uninitialised per-expert
    gradient buffer ``[E, ...]``: the blocks overwrite every other slice, so the buffer is not
    zero-filled first."""
    for e, size in enumerate(plan.sizes):
        if not size:
            grad[e].zero_()
    return grad


def _expert(stacked: Tensor | None, e: int, dtype: torch.dtype) -> Tensor | None:
    """Expert ``e``'s slice of a stacked parameter, in ``dtype``."""
    return None if stacked is None else stacked[e].to(dtype)


def _addmm(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor | None = None) -> Tensor:
    """``x W (+ b)``, into ``out`` when given."""
    if bias is None:
        return torch.mm(x, weight, out=out)
    return torch.addmm(bias, x, weight, out=out)


def _mm_into(out: Tensor, a: Tensor, b: Tensor) -> None:
    """``out = a b``; a product in a narrower dtype than ``out`` is widened into it."""
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(a @ b)


def _sum(parts: list[Tensor]) -> Tensor:
    """The sum of the workers' partial sums, in place in the first."""
    total = parts[0]
    for part in parts[1:]:
        total += part
    return total


class Strategy:
    """A way to run stacked experts on rows grouped by expert (see the module docstring)."""

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None, plan: DispatchPlan) -> Tensor:
        """``y_p = x_p W_{e(p)} + b_{e(p)}`` for pair rows ``x [P, d_in]`` sorted by expert."""
        raise NotImplementedError

    def mlp(
        self,
        x: Tensor,
        w1: Tensor,
        b1: Tensor | None,
        w2: Tensor,
        b2: Tensor | None,
        act: Activation,
        plan: DispatchPlan,
        dtype: torch.dtype,
    ) -> Tensor:
        """``y_i = sum_p w_p (act(x_i W1_e + b1_e) W2_e + b2_e)`` over the pairs ``p`` of row
        ``i``: the input rows ``x [n, C]`` in, the combined output ``[n, C_out]`` out,
        computed in ``dtype`` (the casts of inputs and weights are differentiable)."""
        w1, b1, w2, b2 = (None if t is None else t.to(dtype) for t in (w1, b1, w2, b2))
        h = act(self.linear(plan.gather(x).to(dtype), w1, b1, plan))
        return plan.combine(self.linear(h, w2, b2, plan))


class LoopStrategy(Strategy):
    """Per-expert ``addmm`` loops in custom autograd functions (the CPU default)."""

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None, plan: DispatchPlan) -> Tensor:
        return _LoopGroupedLinear.apply(x, weight, bias, plan)

    def mlp(
        self,
        x: Tensor,
        w1: Tensor,
        b1: Tensor | None,
        w2: Tensor,
        b2: Tensor | None,
        act: Activation,
        plan: DispatchPlan,
        dtype: torch.dtype,
    ) -> Tensor:
        return _LoopExpertMLP.apply(x, w1, b1, w2, b2, plan.weight.float(), act, plan, dtype)


class GroupedMMStrategy(Strategy):
    """One :func:`torch.nn.functional.grouped_mm` per projection (the CUDA default)."""

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None, plan: DispatchPlan) -> Tensor:
        if not grouped_mm_supported(x, weight):
            return STRATEGIES["loop"].linear(x, weight, bias, plan)
        out = F.grouped_mm(x, weight, offs=plan.offsets())
        return out if bias is None else out + bias.index_select(0, plan.expert)


STRATEGIES: dict[str, Strategy] = {"grouped_mm": GroupedMMStrategy(), "loop": LoopStrategy()}

DEFAULT_STRATEGY: dict[str, str] = {"cpu": "loop", "cuda": "grouped_mm"}
"""The faster strategy per device type, as measured with ``moekit bench moe``."""


def grouped_mm_supported(x: Tensor, weight: Tensor) -> bool:
    """Whether ``grouped_mm`` takes these operands (16-byte aligned rows, supported dtype)."""
    if not hasattr(F, "grouped_mm") or x.device.type not in ("cpu", "cuda"):
        return False
    if (x.device.type == "cuda" or torch.compiler.is_compiling()) and x.dtype != torch.bfloat16:
        return False  # the CUDA kernel and the meta kernel used by torch.compile want bfloat16
    align = 16 // x.element_size()
    return weight.shape[-2] % align == 0 and weight.shape[-1] % align == 0


def get_strategy(name: str | None, device: torch.device) -> Strategy:
    """The strategy called ``name``, or the default one for ``device``."""
    if name is None:
        return STRATEGIES[DEFAULT_STRATEGY.get(device.type, "loop")]
    if name not in STRATEGIES:
        raise ConfigError(
            f"unknown dispatch strategy '{name}'; valid: {', '.join(STRATEGIES)}"
            f"{did_you_mean(name, STRATEGIES)}"
        )
    return STRATEGIES[name]


def compute_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype experts compute in: autocast's on ``x``'s device when autocast is on
    (autocast does not cover grouped matmuls or custom functions), else the weights'."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


def grouped_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    plan: DispatchPlan,
    strategy: str | None = None,
) -> Tensor:
    """``y_p = x_p W_{e(p)} + b_{e(p)}`` for the pair rows ``x [P, d_in]`` (``plan.gather``),
    stacked ``weight [E, d_in, d_out]`` and ``bias [E, d_out]``: ``[P, d_out]``, computed in
    the weights' dtype (the autocast dtype under autocast)."""
    dtype = compute_dtype(x, weight)  # differentiable casts: float32 weights get gradients
    x, weight, bias = (None if t is None else t.to(dtype) for t in (x, weight, bias))
    return get_strategy(strategy, x.device).linear(x, weight, bias, plan)


def expert_mlp(
    x: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    act: Activation,
    plan: DispatchPlan,
    strategy: str | None = None,
) -> Tensor:
    """Run the routed expert MLPs on ``x [n, C]`` and combine: ``[n, C_out]``, with
    ``y_i = sum_{(i, e, w) in plan} w * (act(x_i W1_e + b1_e) W2_e + b2_e)``.

    Under autocast the experts run in its dtype and ``y`` comes out in it; the sum over a
    row's pairs is accumulated in float32 and the combine weights stay float32.
    """
    dtype = compute_dtype(x, w1)
    return get_strategy(strategy, x.device).mlp(x, w1, b1, w2, b2, act, plan, dtype)
