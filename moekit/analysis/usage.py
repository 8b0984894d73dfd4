"""Expert usage: how often each expert serves each task, per MoE layer.

For every MoE layer, task ``t`` and expert ``e`` the accumulator sums over a dataset split

- ``count[t, e]``: the number of tokens (or samples, for module experts) of task ``t`` that
  selected expert ``e``;
- ``weight[t, e]``: the summed routing weight those selections carried;
- ``tokens[t]``: the number of tokens of task ``t``;
- ``num_selected``: a histogram of how many experts a token selected (top-p varies it).

From these: ``share[t, e] = count[t, e] / Σ_e' count[t, e']`` — the usage share that
Mod-Squad's per-task extraction thresholds with θ (Chen et al., CVPR 2023, §3.5) — and
``rate[t, e] = count[t, e] / tokens[t]``, the probability that a token of task ``t`` uses ``e``
(the frequency map of the paper's Fig. 5). Everything is a pure function of the
:class:`~moekit.routing.types.RoutingRecord` s a model returns.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from moekit.errors import DataError
from moekit.fileio import atomic_write_text
from moekit.routing.types import RoutingRecord


def _record_tasks(record: RoutingRecord) -> Tensor:
    n = record.routing.index.shape[0]
    if record.task_ids is None:
        return torch.zeros(n, dtype=torch.long, device=record.routing.index.device)
    return record.task_ids.reshape(-1).long()


@dataclass
class LayerUsage:
    """Summed usage statistics of one MoE layer (float64, on the CPU)."""

    count: Tensor  # [T, E]
    weight: Tensor  # [T, E]
    tokens: Tensor  # [T]
    num_selected: Tensor  # [E + 1] histogram of experts selected per token

    @classmethod
    def zeros(cls, num_tasks: int, num_experts: int) -> LayerUsage:
        z = torch.zeros
        return cls(
            z(num_tasks, num_experts, dtype=torch.float64),
            z(num_tasks, num_experts, dtype=torch.float64),
            z(num_tasks, dtype=torch.float64),
            z(num_experts + 1, dtype=torch.float64),
        )

    @property
    def share(self) -> Tensor:
        """``[T, E]`` share of task ``t``'s expert selections that went to ``e`` (rows sum to 1)."""
        return self.count / self.count.sum(dim=1, keepdim=True).clamp(min=1)

    @property
    def rate(self) -> Tensor:
        """``[T, E]`` probability that a token of task ``t`` selects expert ``e``."""
        return self.count / self.tokens.unsqueeze(1).clamp(min=1)

    def mean_selected(self) -> float:
        """Mean number of experts selected per token."""
        k = torch.arange(self.num_selected.numel(), dtype=torch.float64)
        return float((k * self.num_selected).sum() / self.num_selected.sum().clamp(min=1))


@dataclass
class ExpertUsage:
    """Usage of every MoE layer of a model over a split, with the task names."""

    tasks: list[str]
    layers: dict[str, LayerUsage] = field(default_factory=dict)

    def update(self, records: Iterable[RoutingRecord]) -> None:
        """Add the routing of one forward pass."""
        for record in records:
            routing = record.routing
            valid = record.valid.reshape(-1) if record.valid is not None else None
            task_ids = _record_tasks(record)
            selected = routing.selected_mask().double()
            weights = routing.dense_weight().detach().double()
            if valid is not None:
                selected, weights, task_ids = selected[valid], weights[valid], task_ids[valid]
            num_tasks = len(self.tasks) if record.task_ids is not None else 1
            layer = self.layers.setdefault(
                record.layer, LayerUsage.zeros(num_tasks, routing.num_experts)
            )
            t = task_ids.cpu()
            layer.count.index_add_(0, t, selected.cpu())
            layer.weight.index_add_(0, t, weights.cpu())
            layer.tokens.index_add_(0, t, torch.ones_like(t, dtype=torch.float64))
            per_token = selected.sum(dim=1).long().cpu()
            layer.num_selected += torch.bincount(
                per_token, minlength=routing.num_experts + 1
            ).double()

    def task_names_of(self, layer: str) -> list[str]:
        """Task names of a layer's rows (``["all"]`` for a layer that knows no tasks)."""
        return self.tasks if self.layers[layer].count.shape[0] == len(self.tasks) else ["all"]

    def to_frame(self) -> pd.DataFrame:
        """Tidy table: layer, task, expert, count, weight, share, rate."""
        rows = []
        for name, layer in self.layers.items():
            share, rate = layer.share, layer.rate
            for t, task in enumerate(self.task_names_of(name)):
                for e in range(layer.count.shape[1]):
                    rows.append(
                        {
                            "layer": name,
                            "task": task,
                            "expert": e,
                            "count": int(layer.count[t, e]),
                            "weight": float(layer.weight[t, e]),
                            "share": float(share[t, e]),
                            "rate": float(rate[t, e]),
                        }
                    )
        return pd.DataFrame(rows)

    def selected_frame(self) -> pd.DataFrame:
        """Per layer: the mean number of experts selected and the histogram."""
        return pd.DataFrame(
            [
                {
                    "layer": name,
                    "mean_selected": layer.mean_selected(),
                    **{f"k={k}": int(v) for k, v in enumerate(layer.num_selected.tolist())},
                }
                for name, layer in self.layers.items()
            ]
        )

    def save(self, directory: str | Path) -> Path:
        """Write ``usage.safetensors`` (tensors + task names) and the tidy ``usage.csv``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"{name}::{key}": getattr(layer, key).contiguous()
            for name, layer in self.layers.items()
            for key in ("count", "weight", "tokens", "num_selected")
        }
        save_file(
            tensors, directory / "usage.safetensors", metadata={"tasks": ",".join(self.tasks)}
        )
        atomic_write_text(directory / "usage.csv", self.to_frame().to_csv(index=False))
        atomic_write_text(directory / "selected.csv", self.selected_frame().to_csv(index=False))
        return directory / "usage.safetensors"

    @classmethod
    def load(cls, path: str | Path) -> ExpertUsage:
        """Read a ``usage.safetensors`` written by :meth:`save`."""
        from safetensors import safe_open

        path = Path(path)
        if path.is_dir():
            path = path / "usage.safetensors"
        if not path.is_file():
            raise DataError(f"{path}: no expert usage file (run `moekit usage` first)")
        with safe_open(str(path), "pt") as fh:
            tasks = (fh.metadata() or {}).get("tasks", "").split(",")
        tensors = load_file(str(path))
        usage = cls(tasks)
        for key, value in tensors.items():
            name, _, stat = key.rpartition("::")
            layer = usage.layers.setdefault(name, LayerUsage.zeros(1, 1))
            setattr(layer, stat, value)
        return usage


def task_relation(records: Sequence[RoutingRecord], num_tasks: int) -> Tensor:
    """Mod-Squad's task relation (Fig. 6): mean share of experts two tasks use on one input.

    Needs the records of a forward in which every input ran every task, laid out task-major
    (rows of task ``t`` are the ``t``-th equal block), as models produce with
    ``task_mask=None``. For tokens ``j`` seen by tasks ``a`` and ``b`` with selected sets
    ``S_a``, ``S_b``: ``rel[a, b] = mean_j |S_a ∩ S_b| / ((|S_a| + |S_b|) / 2)``, averaged over
    the task-routed layers. Returns ``[T, T]`` (ones on the diagonal).
    """
    relations = []
    for record in records:
        if record.task_ids is None:
            continue
        mask = record.routing.selected_mask().float()
        if mask.shape[0] % num_tasks:
            continue
        per_task = mask.reshape(num_tasks, -1, mask.shape[1])
        sizes = per_task.sum(dim=2)
        inter = torch.einsum("aje,bje->abj", per_task, per_task)
        mean_size = (sizes.unsqueeze(1) + sizes.unsqueeze(0)) / 2
        relations.append((inter / mean_size.clamp(min=1)).mean(dim=2))
    if not relations:
        raise DataError("task relation: no layer routes tokens of several tasks")
    return torch.stack(relations).mean(dim=0)
