"""Expert usage: how often each expert serves each task, per MoE layer.

For every MoE layer, task ``t`` and expert ``e`` the accumulator sums over a dataset split

- ``count[t, e]``: the number of tokens (or samples, for module experts) of task ``t`` that
  selected expert ``e``;
- ``weight[t, e]``: the summed routing weight those selections carried;
- ``probs[t, e]``: the summed gate scores over *all* experts (the soft assignment that
  Mod-Squad's mutual information ``I(T; E)`` is formed from, eq. 5);
- ``tokens[t]``: the number of tokens of task ``t``;
- ``num_selected``: a histogram of how many experts a token selected (top-p varies it).

From these: ``share[t, e] = count[t, e] / Σ_e' count[t, e']``, the share of task ``t``'s
selections that went to ``e`` (rows sum to 1), and ``rate[t, e] = count[t, e] / tokens[t]``,
the probability that a token of task ``t`` uses ``e`` — Mod-Squad's usage frequency
``P(E_e | T_t)`` (Chen et al., CVPR 2023, §3.3), which its per-task extraction thresholds with
θ (§3.5, :func:`moekit.analysis.extraction.experts_to_keep`) and its Fig. 5 maps. Everything is
a pure function of the :class:`~moekit.routing.types.RoutingRecord` s a model returns.

From forwards in which every input ran every task (``task_mask=None``) it also accumulates
Mod-Squad's task relation (Fig. 6, §4.3): for a token ``j`` seen by tasks ``a`` and ``b`` with
selected sets ``S_a``, ``S_b``, ``|S_a ∩ S_b| / ((|S_a| + |S_b|) / 2)``, averaged over tokens
and then over the task-routed layers (see :func:`pair_overlap`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from moekit.analysis.modality import ModalityUsage, modality_names
from moekit.errors import DataError
from moekit.fileio import atomic_write_text
from moekit.losses.aux_mutual_information import mutual_information_from_statistics
from moekit.routing.types import RoutingRecord
from moekit.types import run_model


def _record_tasks(record: RoutingRecord) -> Tensor:
    n = record.routing.index.shape[0]
    if record.task_ids is None:
        return torch.zeros(n, dtype=torch.long, device=record.routing.index.device)
    return record.task_ids.reshape(-1).long()


def pair_overlap(record: RoutingRecord, num_tasks: int) -> tuple[Tensor, Tensor] | None:
    """Summed per-token expert overlap of every pair of tasks in one record.

    The record must come from a forward in which every input ran every task, laid out
    task-major (the rows of task ``t`` are the ``t``-th of ``T`` equal blocks, as models produce
    with ``task_mask=None``). For token ``j`` and tasks ``a``, ``b`` with selected sets ``S_a``,
    ``S_b`` (both non-empty) the overlap is ``|S_a ∩ S_b| / ((|S_a| + |S_b|) / 2)``. Returns
    ``(overlap [T, T], pairs [T, T])``, the sum over tokens and the number of token pairs, or
    ``None`` when the record does not have that layout.
    """
    if record.task_ids is None or num_tasks < 2:
        return None
    task_ids = record.task_ids.reshape(-1)
    n = task_ids.numel()
    if n % num_tasks:
        return None
    expected = torch.arange(num_tasks, device=task_ids.device).repeat_interleave(n // num_tasks)
    if not torch.equal(task_ids.long(), expected):
        return None
    mask = record.routing.selected_mask().double().reshape(num_tasks, n // num_tasks, -1)
    sizes = mask.sum(dim=2)
    inter = torch.einsum("aje,bje->abj", mask, mask)
    mean_size = (sizes.unsqueeze(1) + sizes.unsqueeze(0)) / 2
    both = (sizes.unsqueeze(1) > 0) & (sizes.unsqueeze(0) > 0)
    overlap = torch.where(both, inter / mean_size.clamp(min=1), 0.0)
    return overlap.sum(dim=2).cpu(), both.sum(dim=2).double().cpu()


@dataclass
class LayerUsage:
    """Summed usage statistics of one MoE layer (float64, on the CPU)."""

    count: Tensor  # [T, E]
    weight: Tensor  # [T, E]
    probs: Tensor  # [T, E] summed gate scores over all experts
    tokens: Tensor  # [T]
    num_selected: Tensor  # [E + 1] histogram of experts selected per token
    overlap: Tensor  # [T, T] summed per-token overlap of two tasks' experts (pair_overlap)
    pairs: Tensor  # [T, T] number of token pairs in ``overlap``

    STATS = ("count", "weight", "probs", "tokens", "num_selected", "overlap", "pairs")

    @classmethod
    def zeros(cls, num_tasks: int, num_experts: int) -> LayerUsage:
        z = torch.zeros
        return cls(
            z(num_tasks, num_experts, dtype=torch.float64),
            z(num_tasks, num_experts, dtype=torch.float64),
            z(num_tasks, num_experts, dtype=torch.float64),
            z(num_tasks, dtype=torch.float64),
            z(num_experts + 1, dtype=torch.float64),
            z(num_tasks, num_tasks, dtype=torch.float64),
            z(num_tasks, num_tasks, dtype=torch.float64),
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

    def mutual_information(self) -> float | None:
        """Measured ``I(T; E)`` in nats (Mod-Squad eq. 5) from the summed gate scores, or
        ``None`` for a layer that routes one task only."""
        if self.count.shape[0] < 2:
            return None
        stats = torch.cat([self.probs, self.tokens.unsqueeze(1)], dim=1)
        return float(mutual_information_from_statistics(stats))

    def relation(self) -> Tensor | None:
        """``[T, T]`` mean overlap of two tasks' experts on the same token, or ``None`` if no
        all-task forward reached the layer."""
        if not bool((self.pairs > 0).any()):
            return None
        return self.overlap / self.pairs.clamp(min=1)


@dataclass
class ExpertUsage:
    """Usage of every MoE layer of a model over a split, with the task names."""

    tasks: list[str]
    layers: dict[str, LayerUsage] = field(default_factory=dict)
    info: dict[str, str] = field(default_factory=dict)
    modality: ModalityUsage | None = None
    """Modality utilisation of the layers whose records carry modality ids
    (:mod:`moekit.analysis.modality`; counted by :func:`collect_usage` on multi-modal data)."""

    def update(self, records: Iterable[RoutingRecord]) -> None:
        """Add the routing of one forward pass (and its task overlaps, see
        :func:`pair_overlap`, when every input ran every task)."""
        records = list(records)
        if self.modality is not None:
            self.modality.update(records)
        for record in records:
            routing = record.routing
            valid = record.valid.reshape(-1) if record.valid is not None else None
            task_ids = _record_tasks(record)
            selected = routing.selected_mask().double()
            weights = routing.dense_weight().detach().double()
            probs = routing.probs.detach().double()
            if valid is not None:
                selected, weights, task_ids = selected[valid], weights[valid], task_ids[valid]
                probs = probs[valid]
            num_tasks = len(self.tasks) if record.task_ids is not None else 1
            layer = self.layers.setdefault(
                record.layer, LayerUsage.zeros(num_tasks, routing.num_experts)
            )
            t = task_ids.cpu()
            layer.count.index_add_(0, t, selected.cpu())
            layer.weight.index_add_(0, t, weights.cpu())
            layer.probs.index_add_(0, t, probs.cpu())
            layer.tokens.index_add_(0, t, torch.ones_like(t, dtype=torch.float64))
            per_token = selected.sum(dim=1).long().cpu()
            layer.num_selected += torch.bincount(
                per_token, minlength=routing.num_experts + 1
            ).double()
            paired = pair_overlap(record, num_tasks)
            if paired is not None:
                layer.overlap += paired[0]
                layer.pairs += paired[1]

    def task_relation(self) -> Tensor:
        """Mod-Squad's task relation (Fig. 6): ``[T, T]``, the mean over task-routed layers of
        the mean share of experts two tasks use on the same token (ones on the diagonal)."""
        relations = [r for layer in self.layers.values() if (r := layer.relation()) is not None]
        if not relations:
            raise DataError(
                "task relation: no layer routed tokens of several tasks on the same inputs"
            )
        return torch.stack(relations).mean(dim=0)

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
        """Per layer: the mean number of experts selected, the histogram and the measured
        ``I(T; E)`` (empty for a layer that routes one task).

        The histogram columns ``k=0 .. k=E_max`` run to the largest expert count of any layer;
        a layer with fewer experts has 0 in the columns it cannot reach (no token of a
        15-expert layer selects 16 experts), so layers of different sizes share one table of
        integer counts.
        """
        width = max((layer.num_selected.numel() for layer in self.layers.values()), default=1)
        rows = []
        for name, layer in self.layers.items():
            hist = layer.num_selected.tolist()
            hist += [0.0] * (width - len(hist))
            rows.append(
                {
                    "layer": name,
                    "mean_selected": layer.mean_selected(),
                    "mutual_information": layer.mutual_information(),
                    **{f"k={k}": int(v) for k, v in enumerate(hist)},
                }
            )
        return pd.DataFrame(rows)

    def save(self, directory: str | Path) -> Path:
        """Write ``usage.safetensors`` (tensors; task names and :attr:`info` as metadata), the
        tidy ``usage.csv`` and ``selected.csv`` (experts selected per token, per layer), and
        with modality statistics ``modality.csv`` and ``modality_information.csv``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"{name}::{key}": getattr(layer, key).contiguous()
            for name, layer in self.layers.items()
            for key in LayerUsage.STATS
        }
        metadata = {"tasks": json.dumps(self.tasks), "info": json.dumps(self.info)}
        save_file(tensors, directory / "usage.safetensors", metadata=metadata)
        atomic_write_text(directory / "usage.csv", self.to_frame().to_csv(index=False))
        atomic_write_text(directory / "selected.csv", self.selected_frame().to_csv(index=False))
        if self.modality is not None and self.modality.layers:
            self.modality.save(directory)
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
            metadata = fh.metadata() or {}
        tensors = load_file(str(path))
        tasks = json.loads(metadata.get("tasks", "[]"))
        usage = cls(tasks, info=json.loads(metadata.get("info", "{}")))
        for key, value in tensors.items():
            name, _, stat = key.rpartition("::")
            layer = usage.layers.setdefault(name, LayerUsage.zeros(1, 1))
            setattr(layer, stat, value)
        for layer in usage.layers.values():
            if layer.probs.shape != layer.count.shape:  # written before probs were counted
                layer.probs = torch.zeros_like(layer.count)
        return usage


def task_relation(records: Sequence[RoutingRecord], num_tasks: int) -> Tensor:
    """Mod-Squad's task relation (Fig. 6) of one forward in which every input ran every task
    (``task_mask=None``): ``[T, T]``, ones on the diagonal (see :func:`pair_overlap`)."""
    tasks = [str(t) for t in range(num_tasks)]
    usage = ExpertUsage(tasks)
    usage.update(r for r in records if r.task_ids is not None)
    return usage.task_relation()


def collect_usage(
    model: torch.nn.Module,
    batches: Iterable[Any],
    tasks: Sequence[str],
    device: torch.device | str = "cpu",
    max_batches: int | None = None,
    progress: Callable[[Iterable[Any]], Iterable[Any]] = lambda it: it,
    info: Mapping[str, str] | None = None,
) -> ExpertUsage:
    """Run ``model`` (in eval mode, no gradients) over ``batches`` and count expert usage.

    Every sample runs every task (``task_mask=None``), as at inference, so the task relation is
    accumulated too; on multi-modal batches, the modality utilisation as well
    (:attr:`ExpertUsage.modality`). ``progress`` wraps the batches (e.g. ``tqdm``); ``info`` is
    saved with the counts (split, checkpoint...).
    """
    usage = ExpertUsage(list(tasks), info=dict(info or {}))
    model.eval()
    with torch.no_grad():
        for i, batch in enumerate(progress(batches)):
            if max_batches is not None and i >= max_batches:
                break
            if usage.modality is None and batch.present is not None:
                names = modality_names(model, batch.modalities)
                usage.modality = ModalityUsage(list(tasks), names)
            usage.update(run_model(model, batch.to(device)).routing)
    return usage
