"""The base of routing (auxiliary) losses: pure functions of :class:`RoutingRecord` lists.

An ``AUX_LOSSES`` entry is built from ``{type: name, **kwargs}`` and called as
``loss(records) -> scalar``, already signed as a quantity to minimise; the config's ``weight``
is applied by the trainer. Each loss sums its per-layer value over the records whose layer name
matches the ``layers`` regular expression (all layers when ``None``), and counts only the tokens
with ``record.valid`` true.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from moekit.routing.types import RoutingRecord

Reduce = Callable[[Tensor], Tensor]

EPS = 1e-8


def distributed() -> bool:
    """Whether a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over all processes with an autograd-aware all-reduce (identity when not
    distributed).

    Its backward all-reduces the gradients too, so each rank receives ``world_size`` times its
    share of the gradient of the loss every rank computes from the same global statistics;
    DDP's gradient averaging divides that factor back out. This is the functional collective
    that ``torch.distributed.nn.functional.all_reduce`` (deprecated) points to; it also traces
    under ``torch.compile``.
    """
    if not distributed():
        return t
    from torch.distributed._functional_collectives import all_reduce

    return all_reduce(t, "sum", dist.group.WORLD)


def global_count(local: int, device: torch.device) -> int:
    """The maximum of ``local`` over all processes (``local`` when not distributed)."""
    if not distributed():
        return local
    value = torch.tensor([local], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())


def num_ids(ids: Tensor, given: int | None) -> int:
    """``given``, or the number of ids seen in the batch of any process (``max + 1``)."""
    if given is not None:
        return given
    local = int(ids.max()) + 1 if ids.numel() else 1
    return global_count(local, ids.device)


def entropy(p: Tensor, dim: int = -1) -> Tensor:
    """``H(p) = -sum p log p`` along ``dim`` (``log`` clamped at ``EPS``)."""
    return -(p * p.clamp_min(EPS).log()).sum(dim=dim)


def valid_rows(record: RoutingRecord, t: Tensor | None) -> Tensor | None:
    """The rows of a per-token tensor that count (``record.valid``)."""
    if t is None or record.valid is None:
        return t
    return t[record.valid.reshape(-1).to(t.device)]


class RoutingLoss:
    """Sum of :meth:`layer_loss` over the selected records.

    Args:
        layers: regular expression searched in ``record.layer``; ``None`` takes every layer.
    """

    def __init__(self, layers: str | None = None) -> None:
        self.layers = layers
        self._pattern = re.compile(layers) if layers is not None else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layers={self.layers!r})"

    def select(self, records: Sequence[RoutingRecord]) -> list[RoutingRecord]:
        if self._pattern is None:
            return list(records)
        return [r for r in records if self._pattern.search(r.layer)]

    def layer_loss(self, record: RoutingRecord) -> Tensor:
        raise NotImplementedError

    def __call__(self, records: Sequence[RoutingRecord]) -> Tensor:
        """The summed loss, a float32 scalar: computed with autocast disabled, so under bf16 or
        fp16 mixed precision the statistics and logarithms stay in float32."""
        selected = self.select(records)
        if not selected:
            device = records[0].routing.probs.device if records else None
            return torch.zeros((), device=device)
        with torch.autocast(selected[0].routing.probs.device.type, enabled=False):
            return torch.stack([self.layer_loss(r).float() for r in selected]).sum()
