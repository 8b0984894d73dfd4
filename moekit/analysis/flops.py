"""FLOPs and parameters of a model for a given input, counting only the experts that ran.

FLOPs are counted with fvcore's :class:`~fvcore.nn.FlopCountAnalysis`, which traces the model
(``torch.jit.trace``) on the given input and counts **multiply-adds** (one multiply-add = one
FLOP, the convention of vision papers: Mod-Squad's "GFLOPs" are fvcore's). The trace records the
ops of the routing actually taken, so a routed expert costs only the (token, expert) pairs that
selected it. moekit adds handles for the ops fvcore leaves at zero:

- ``aten::scaled_dot_product_attention`` (``q [..., L, d]``, ``k [..., S, d]``,
  ``v [..., S, d_v]``): ``prod(batch dims) · L · S · (d + d_v)`` (``QK^T`` and ``AV``);
- ``aten::_grouped_mm`` (``x [P, d_in]`` by stacked ``w [E, d_in, d_out]``, rows grouped by
  expert): ``P · d_in · d_out``;
- ``prim::PythonOp`` of the loop dispatch's ``_LoopGroupedLinear`` (same operands and count).
  Other Python ops (custom autograd functions) count zero and are listed in ``unknown_ops``.

Elementwise ops, softmax, GELU, routing (top-k, sorting) and indexing count zero (fvcore's
convention; listed in ``uncounted_ops``). The MoE layers are traced with the ``grouped_mm``
dispatch strategy (falling back to the loop linear for unaligned sizes); the fused loop MLP of
the CPU default cannot be traced, and the strategy changes no count.

Parameters: ``params`` counts every parameter. ``active_params`` counts the parameters one
token uses on average: every parameter outside the experts, plus for each MoE layer
``k̄ · P_e`` with ``k̄`` the mean number of experts its tokens selected on the input and
``P_e`` the parameters of one expert.

What is counted for whom:

- **all tasks** (the top level of :func:`flops_report`): the model as given, every task on
  every input — all heads, every gate of every per-task router (a gate of ``T`` tasks costs
  ``n · C · T · E`` as :class:`~moekit.routing.gate.Gate` computes it for a mixed batch), all
  task embeddings;
- **one task** (``per_task``, and the "before" column of ``moekit prune``): the model reduced
  to that task by its own ``single_task`` (:func:`task_model`, a copy) — the shared layers and
  every expert, but only that task's head, its row of each gate (``n · C · E``) and its task
  embedding; ``params`` is then that single-task network's size and ``active_params`` the part
  a token of the task uses. A model without ``single_task`` is run with the other tasks
  masked out instead (``counted: "all heads and gates"`` in the report).

The input is an image tensor, a ``{modality: tensor}`` dict, or a
:class:`~moekit.types.Batch`: a multi-modal batch's ``present`` mask is passed to the model
(:func:`moekit.types.run_model`), so a modality a sample lacks costs nothing, as at inference.

:func:`reference_macs` recounts the matmul-type ops with
:class:`torch.utils.flop_counter.FlopCounterMode` (2 FLOPs per multiply-add, halved) as a
cross-check that shares no formula with the fvcore handles: the MoE layers run the per-expert
``mm`` loop (not ``_grouped_mm``) and attention runs torch's math backend (explicit ``bmm``),
so every op is counted by torch's own formulas.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from moekit.moe import moe_layers
from moekit.routing.types import RoutingRecord
from moekit.types import Batch

UNIT = "multiply-adds (fvcore convention: 1 multiply-add = 1 FLOP)"
MATMUL_OPS = frozenset(
    {
        "addmm",
        "bmm",
        "conv",
        "einsum",
        "linear",
        "matmul",
        "mm",
        "scaled_dot_product_attention",
        "_grouped_mm",
        "PythonOp._LoopGroupedLinear",
    }
)
"""fvcore operator names of matrix products, convolutions and attention (what
:func:`reference_macs` recounts)."""

TRACEABLE_STRATEGY = "grouped_mm"
PYTHON_OP = "prim::PythonOp"


def _fvcore() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import fvcore.nn

    return fvcore.nn


def _shape(value: Any) -> list[int]:
    from fvcore.nn.jit_handles import get_shape

    return list(get_shape(value))


def sdpa_flops(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore handle of ``aten::scaled_dot_product_attention``: ``B·L·S·(d + d_v)``."""
    q, k, v = (_shape(inputs[i]) for i in range(3))
    return math.prod(q[:-2]) * q[-2] * k[-2] * (q[-1] + v[-1])


def loop_linear_flops(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore handle of the loop dispatch's ``_LoopGroupedLinear`` (``x [P, d_in]``,
    ``w [E, d_in, d_out]``, ...): ``P · d_in · d_out``."""
    x, w = _shape(inputs[0]), _shape(inputs[1])
    return x[0] * w[-2] * w[-1]


def grouped_mm_flops(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore handle of ``aten::_grouped_mm``: ``prod(out) · d_in`` (``x [P, d_in]`` by
    ``w [E, d_in, d_out]`` -> ``[P, d_out]``, or batched ``[G, M, K]`` by ``[G, K, N]``)."""
    x = _shape(inputs[0])
    return math.prod(_shape(outputs[0])) * x[-1]


@dataclass
class FlopCount:
    """What :func:`count_flops` measured for one input."""

    total: int
    per_module: dict[str, int]
    per_operator: dict[str, int]
    uncounted_ops: dict[str, int]
    unknown_ops: dict[str, int]

    @property
    def matmul_total(self) -> int:
        """Multiply-adds of matrix products, convolutions and attention only."""
        return sum(v for k, v in self.per_operator.items() if k in MATMUL_OPS)


@contextmanager
def _inference_with_strategy(model: nn.Module, strategy: str) -> Iterator[None]:
    """Eval mode, no gradients, and every MoE layer on the dispatch ``strategy``; the model's
    mode and strategies are restored on exit."""
    layers = [layer for _, layer in moe_layers(model) if hasattr(layer, "strategy")]
    saved = [layer.strategy for layer in layers]
    training = model.training
    model.eval()
    for layer in layers:
        layer.strategy = strategy
    try:
        with torch.no_grad():
            yield
    finally:
        for layer, previous in zip(layers, saved, strict=True):
            layer.strategy = previous
        model.train(training)


@contextmanager
def traceable(model: nn.Module) -> Iterator[None]:
    """Eval mode, no gradients, and MoE layers on the traceable dispatch strategy."""
    with _inference_with_strategy(model, TRACEABLE_STRATEGY):
        yield


def model_arguments(inputs: Any) -> tuple[Any, ...]:
    """``(inputs,)``, or ``(inputs, present)`` for a multi-modal :class:`~moekit.types.Batch`:
    the positional arguments of :class:`_Predictions` (what is traced)."""
    if isinstance(inputs, Batch):
        return (inputs.inputs,) if inputs.present is None else (inputs.inputs, inputs.present)
    return (inputs,)


def call_model(model: nn.Module, inputs: Any, task_mask: Mapping[str, Tensor] | None) -> Any:
    """``model``'s output on ``inputs`` (a tensor, a dict or a :class:`~moekit.types.Batch`,
    whose ``present`` is passed)."""
    return _Predictions(model, task_mask).output(*model_arguments(inputs))


class _Predictions(nn.Module):
    """The model as a traceable function: inputs [, present] -> tuple of per-task
    predictions."""

    def __init__(self, model: nn.Module, task_mask: Mapping[str, Tensor] | None) -> None:
        super().__init__()
        self.model = model
        self.task_mask = task_mask

    def output(self, inputs: Any, present: Tensor | None = None) -> Any:
        if present is None:
            return self.model(inputs, task_mask=self.task_mask)
        return self.model(inputs, task_mask=self.task_mask, present=present)

    def forward(self, inputs: Any, present: Tensor | None = None) -> tuple[Tensor, ...]:
        return tuple(self.output(inputs, present).preds.values())


def count_flops(
    model: nn.Module, inputs: Any, task_mask: Mapping[str, Tensor] | None = None
) -> FlopCount:
    """Multiply-adds of ``model(inputs, task_mask)``: total, per module path, per operator."""
    fvnn = _fvcore()
    with traceable(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = fvnn.FlopCountAnalysis(_Predictions(model, task_mask), model_arguments(inputs))
        analysis.set_op_handle(
            "aten::scaled_dot_product_attention",
            sdpa_flops,
            "aten::_grouped_mm",
            grouped_mm_flops,
            f"{PYTHON_OP}._LoopGroupedLinear",
            loop_linear_flops,
        )
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        analysis.tracer_warnings("none")
        total = int(analysis.total())
        per_module = {
            name.removeprefix("model").removeprefix("."): int(value)
            for name, value in analysis.by_module().items()
            if name
        }
        per_operator = {k: int(v) for k, v in analysis.by_operator().items()}
        skipped = analysis.unsupported_ops()
    uncounted = {k: v for k, v in skipped.items() if not k.startswith(PYTHON_OP)}
    unknown = {k: v for k, v in skipped.items() if k.startswith(PYTHON_OP)}
    return FlopCount(total, per_module, per_operator, uncounted, unknown)


def count_parameters(model: nn.Module) -> int:
    """Every parameter of ``model``."""
    return sum(p.numel() for p in model.parameters())


def mean_selected(records: list[RoutingRecord], layer: str) -> float | None:
    """Mean number of experts a token selected in ``layer`` (valid tokens only)."""
    counts = []
    for record in records:
        if record.layer == layer:
            selected = record.routing.num_selected()
            if record.valid is not None:
                selected = selected[record.valid.reshape(-1).to(selected.device)]
            counts.append(selected.double())
    if not counts:
        return None
    return float(torch.cat(counts).mean()) if sum(c.numel() for c in counts) else 0.0


def active_parameters(model: nn.Module, records: list[RoutingRecord]) -> int:
    """Parameters one token uses on average (see the module docstring): the non-expert
    parameters plus ``k̄ · P_e`` per MoE layer (a layer that did not run adds no experts)."""
    total = float(count_parameters(model))
    for _, layer in moe_layers(model):
        experts = sum(p.numel() for p in layer.expert_parameters())
        k_bar = mean_selected(records, layer.name) or 0.0
        total += k_bar * experts / max(layer.num_experts, 1) - experts
    return round(total)


def routing_records(
    model: nn.Module, inputs: Any, task_mask: Mapping[str, Tensor] | None = None
) -> list[RoutingRecord]:
    """The routing records of one forward pass (eval mode, no gradients)."""
    with traceable(model):
        return call_model(model, inputs, task_mask).routing


REFERENCE_STRATEGY = "loop"


@contextmanager
def reference_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode, no gradients, MoE layers on the per-expert ``mm`` loop and attention on
    torch's math backend: every matmul-type op is one torch's flop counter knows."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with _inference_with_strategy(model, REFERENCE_STRATEGY), sdpa_kernel(SDPBackend.MATH):
        yield


def reference_macs(
    model: nn.Module, inputs: Any, task_mask: Mapping[str, Tensor] | None = None
) -> int:
    """Multiply-adds of matrix products, convolutions and attention counted by
    :class:`torch.utils.flop_counter.FlopCounterMode` (its FLOPs / 2) — an fvcore-independent
    cross-check of :attr:`FlopCount.matmul_total` that uses no custom formula: it runs the
    model in :func:`reference_mode`, so experts are ``mm`` per expert and attention is the
    math backend's ``bmm`` (a wrong handle in :func:`count_flops` shows as a mismatch)."""
    from torch.utils.flop_counter import FlopCounterMode

    with reference_mode(model), FlopCounterMode(display=False) as counter:
        call_model(model, inputs, task_mask)
    return counter.get_total_flops() // 2


def task_model(model: nn.Module, task: str) -> nn.Module | None:
    """A copy of ``model`` reduced to ``task`` by its ``single_task`` (its head, its gate rows,
    its task embedding; every expert kept), or ``None`` for a model without one."""
    if not hasattr(model, "single_task"):
        return None
    single = copy.deepcopy(model)
    single.single_task(task)
    return single


def task_alone(
    model: nn.Module, inputs: Any, task_names: list[str], task: str
) -> tuple[nn.Module, dict[str, Tensor] | None]:
    """``(network, task_mask)`` that runs ``task`` alone on ``inputs``: the copy of
    :func:`task_model` and no mask, or, for a model without ``single_task``, the model itself
    with the other tasks masked out."""
    from moekit.analysis.runs import input_batch_size, only_task

    single = task_model(model, task)
    if single is not None:
        return single, None
    return model, only_task(task_names, task, input_batch_size(inputs), _device(inputs))


def task_counts(model: nn.Module, inputs: Any, task_names: list[str], task: str) -> dict[str, Any]:
    """FLOPs and parameters of ``task`` alone (see the module docstring: only its head and its
    gate rows count, through :func:`task_alone`)."""
    from moekit.analysis.runs import input_batch_size

    batch = input_batch_size(inputs)
    single, mask = task_alone(model, inputs, task_names, task)
    counted = (
        "this task's head and gate rows"
        if mask is None
        else "all heads and gates (the model has no single_task)"
    )
    flops = count_flops(single, inputs, mask).total
    return {
        "flops": flops,
        "flops_per_sample": round(flops / batch),
        "params": count_parameters(single),
        "active_params": active_parameters(single, routing_records(single, inputs, mask)),
        "counted": counted,
    }


def flops_report(
    model: nn.Module,
    inputs: Any,
    task_names: list[str],
    per_task: bool = False,
    depth: int = 2,
) -> dict[str, Any]:
    """Parameters and FLOPs of ``model`` on ``inputs`` (every task, and each task alone with
    ``per_task``: only its head and gate rows, :func:`task_counts`), as the JSON object
    ``moekit flops --json`` prints.

    ``per_module`` lists modules nested at most ``depth`` deep, and every MoE layer.
    """
    from moekit.analysis.runs import input_batch_size

    batch = input_batch_size(inputs)
    count = count_flops(model, inputs)
    modules = dict(model.named_modules())
    moe_names = {name for name, _ in moe_layers(model)}
    per_module = {
        name: {"flops": value, "params": count_parameters(modules[name])}
        for name, value in count.per_module.items()
        if name in modules and (name.count(".") < depth or name in moe_names)
    }
    report: dict[str, Any] = {
        "unit": UNIT,
        "batch": batch,
        "params": count_parameters(model),
        "active_params": active_parameters(model, routing_records(model, inputs)),
        "flops": count.total,
        "flops_per_sample": round(count.total / batch),
        "matmul_flops": count.matmul_total,
        "per_module": per_module,
        "per_task": {},
        "uncounted_ops": sorted(count.uncounted_ops),
        "unknown_ops": count.unknown_ops,
    }
    for task in task_names if per_task else []:
        report["per_task"][task] = task_counts(model, inputs, task_names, task)
    return report


def _device(inputs: Any) -> torch.device:
    if isinstance(inputs, Batch):
        return inputs.first_input.device
    return inputs.device if isinstance(inputs, Tensor) else next(iter(inputs.values())).device
