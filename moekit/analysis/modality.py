"""Modality utilisation: how much of each task's routing mass comes from each modality.

For a MoE layer whose routing records carry per-token ``modality_ids`` (a multi-modal model's
layers over the tokens of several modalities, e.g. M4oE's MToE), sum over a split's valid
tokens ``x`` of task ``t`` and modality ``m``:

- ``mass[t, m] = Σ_x r(x)``, where ``r(x)`` is how much the layer reads token ``x``: its
  ``dispatch_mass`` where the record has one (Soft MoE: ``Σ_j D[x, j]`` over the slots of the
  token's (sample, task) sequence — the slots are weighted averages of the tokens, so this is
  the weight the task's experts give the token), else its summed routing weight
  ``Σ_e w[x, e]`` (token-choice layers; 1 per token when the weights are renormalised, so
  there the utilisation is the modality's token share);
- ``tokens[t, m]``, the number of such tokens, and ``probs[t, m, e]``, their summed routing
  probabilities over the experts.

The **utilisation** of modality ``m`` by task ``t`` is ``share[t, m] = mass[t, m] / Σ_m'
mass[t, m']`` (rows sum to 1; M4oE, Wu et al., ICLR 2025, Fig. 4b). Against it stands
``token_share[t, m]``, the modality's share of the tokens: a layer that read every token alike
would give ``share = token_share``. Every sequence of a Soft MoE layer spreads the same total
dispatch mass (its slot count), so ``share`` is the mean over samples of the per-sample shares.

``probs`` gives the measured conditional mutual information ``I(M; E | T)`` of the layer
(:func:`~moekit.losses.aux_mutual_information.conditional_mutual_information_from_statistics`,
what M4oE's loss maximises), in nats.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor

from moekit.fileio import atomic_write_text
from moekit.losses.aux_mutual_information import conditional_mutual_information_from_statistics
from moekit.routing.types import RoutingRecord


def token_mass(record: RoutingRecord) -> Tensor:
    """``[n]`` how much the layer reads each token: ``dispatch_mass``, else the token's summed
    routing weight."""
    if record.dispatch_mass is not None:
        return record.dispatch_mass.detach().reshape(-1).double()
    return record.routing.dense_weight().detach().double().sum(dim=1)


@dataclass
class LayerModalityUsage:
    """Summed modality statistics of one MoE layer (float64, on the CPU)."""

    mass: Tensor  # [T, M]
    tokens: Tensor  # [T, M]
    probs: Tensor  # [T, M, E]

    @classmethod
    def zeros(cls, num_tasks: int, num_modalities: int, num_experts: int) -> LayerModalityUsage:
        z = torch.zeros
        return cls(
            z(num_tasks, num_modalities, dtype=torch.float64),
            z(num_tasks, num_modalities, dtype=torch.float64),
            z(num_tasks, num_modalities, num_experts, dtype=torch.float64),
        )

    @property
    def share(self) -> Tensor:
        """``[T, M]``: the share of task ``t``'s routing mass from modality ``m``'s tokens."""
        return self.mass / self.mass.sum(dim=1, keepdim=True).clamp(min=1e-12)

    @property
    def token_share(self) -> Tensor:
        """``[T, M]``: the share of task ``t``'s tokens that are of modality ``m``."""
        return self.tokens / self.tokens.sum(dim=1, keepdim=True).clamp(min=1)

    def conditional_mutual_information(self) -> float:
        """Measured ``I(M; E | T)`` in nats from the summed routing probabilities."""
        stats = torch.cat([self.probs, self.tokens.unsqueeze(-1)], dim=-1)
        return float(conditional_mutual_information_from_statistics(stats.float()))


@dataclass
class ModalityUsage:
    """Modality utilisation of every layer whose records carry modality ids."""

    tasks: list[str]
    modalities: list[str]
    layers: dict[str, LayerModalityUsage] = field(default_factory=dict)

    def update(self, records: Iterable[RoutingRecord]) -> None:
        """Add the records of one forward pass (those without ``modality_ids`` are skipped)."""
        for record in records:
            if record.modality_ids is None:
                continue
            probs = record.routing.probs.detach().double()
            mass = token_mass(record)
            modality_ids = record.modality_ids.reshape(-1).long()
            task_ids = (
                torch.zeros_like(modality_ids)
                if record.task_ids is None
                else record.task_ids.reshape(-1).long()
            )
            if record.valid is not None:
                valid = record.valid.reshape(-1).bool()
                probs, mass = probs[valid], mass[valid]
                modality_ids, task_ids = modality_ids[valid], task_ids[valid]
            num_tasks = len(self.tasks) if record.task_ids is not None else 1
            layer = self.layers.setdefault(
                record.layer,
                LayerModalityUsage.zeros(num_tasks, len(self.modalities), probs.shape[1]),
            )
            t, m = task_ids.cpu(), modality_ids.cpu()
            layer.mass.index_put_((t, m), mass.cpu(), accumulate=True)
            layer.tokens.index_put_((t, m), torch.ones_like(mass.cpu()), accumulate=True)
            layer.probs.index_put_((t, m), probs.cpu(), accumulate=True)

    def task_names_of(self, layer: str) -> list[str]:
        """Task names of a layer's rows (``["all"]`` for a layer that knows no tasks)."""
        return self.tasks if self.layers[layer].mass.shape[0] == len(self.tasks) else ["all"]

    def mixing_layers(self) -> list[str]:
        """The layers that saw tokens of more than one modality (per-modality layers, whose
        utilisation is 1 by construction, are left out)."""
        return [
            name
            for name, layer in self.layers.items()
            if int((layer.tokens.sum(dim=0) > 0).sum()) > 1
        ]

    def to_frame(self) -> pd.DataFrame:
        """Tidy table: layer, task, modality, tokens, mass, share, token_share (layers over
        several modalities)."""
        rows = []
        for name in self.mixing_layers():
            layer = self.layers[name]
            share, token_share = layer.share, layer.token_share
            for t, task in enumerate(self.task_names_of(name)):
                for m, modality in enumerate(self.modalities):
                    rows.append(
                        {
                            "layer": name,
                            "task": task,
                            "modality": modality,
                            "tokens": int(layer.tokens[t, m]),
                            "mass": float(layer.mass[t, m]),
                            "share": float(share[t, m]),
                            "token_share": float(token_share[t, m]),
                        }
                    )
        return pd.DataFrame(
            rows, columns=["layer", "task", "modality", "tokens", "mass", "share", "token_share"]
        )

    def information_frame(self) -> pd.DataFrame:
        """Per layer over several modalities: the measured ``I(M; E | T)`` in nats."""
        return pd.DataFrame(
            [
                {
                    "layer": name,
                    "conditional_mutual_information": self.layers[
                        name
                    ].conditional_mutual_information(),
                }
                for name in self.mixing_layers()
            ],
            columns=["layer", "conditional_mutual_information"],
        )

    def save(self, directory: str | Path) -> Path:
        """Write ``modality.csv`` (:meth:`to_frame`) and ``modality_information.csv``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / "modality.csv", self.to_frame().to_csv(index=False))
        atomic_write_text(
            directory / "modality_information.csv",
            self.information_frame().to_csv(index=False),
        )
        return directory / "modality.csv"


def modality_names(model: torch.nn.Module, batch_modalities: Sequence[str]) -> list[str]:
    """The names behind the records' modality ids: the model's ``modality_names`` (the order
    its records use), else the batch's modality order."""
    names = getattr(model, "modality_names", None)
    return list(names) if names else list(batch_modalities)
