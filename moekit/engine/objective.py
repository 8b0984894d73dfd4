"""The training objective: task losses over labelled rows, task weighting, routing losses.

For task ``t`` with per-sample loss ``ℓ_t,i = Σ_terms w · loss(pred_i, target_i)`` over the
labelled samples ``i`` of the global batch (all processes), the task loss is the mean
``L_t = Σ_i ℓ_t,i / n_t``. Each process computes its share ``P · Σ_{i local} ℓ_t,i / n_t``
(``n_t`` is all-reduced), so the gradients data parallelism averages over ``P`` processes are
those of the whole batch, whatever the split of labelled samples. Tasks with ``n_t = 0`` are
left out. The total is ``weighting({L_t}) + Σ_a w_a · aux_a(routing records)`` (an aux loss
with ``needs_batch`` also sees the predictions and the batch, and watches the model's forward).

The objective is an ``nn.Module`` around the model so that one DDP wrapper covers the model
and learned weightings alike.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moekit.errors import ConfigError
from moekit.routing.types import RoutingRecord
from moekit.types import Batch, ModelOutput, Task, run_model


@dataclass
class AuxTerm:
    """A routing loss of the config: ``weight · loss(records)``, logged as ``aux/<name>``."""

    name: str
    weight: float
    loss: Callable[[list[RoutingRecord]], Tensor]


@dataclass
class StepOutput:
    """What one forward of the objective produced."""

    loss: Tensor
    task_losses: dict[str, Tensor]
    aux_losses: dict[str, Tensor]
    sample_losses: dict[str, Tensor]
    preds: dict[str, Tensor]
    routing: list[RoutingRecord] = field(default_factory=list)

    def logged(self) -> Tensor:
        """``[1 + A]``: the total and each routing loss, detached (summed over an epoch)."""
        return torch.stack(
            [self.loss.detach().float(), *(v.detach().float() for v in self.aux_losses.values())]
        )

    def watched(self) -> Tensor:
        """Every task loss (0 for a task without labels in the batch), every routing loss and
        the total, detached: what must stay finite."""
        zero = self.loss.new_zeros(())
        tasks = [self.task_losses.get(t, zero) for t in self.sample_losses]
        values = [*tasks, *self.aux_losses.values(), self.loss]
        return torch.stack([v.detach().float().reshape(()) for v in values])


class MultiTaskObjective(nn.Module):
    """Model + task losses + weighting + routing losses, as one module for accelerate/DDP."""

    def __init__(
        self,
        model: nn.Module,
        tasks: Mapping[str, Task],
        losses: Mapping[str, Sequence[tuple[float, nn.Module]]],
        weighting: nn.Module,
        aux_terms: Sequence[AuxTerm] = (),
    ) -> None:
        super().__init__()
        self.model = model
        self.weighting = weighting
        self.task_names = list(tasks)
        self.losses = nn.ModuleDict(
            {t: nn.ModuleList([loss for _, loss in losses[t]]) for t in self.task_names}
        )
        self.loss_weights = {t: [float(w) for w, _ in losses[t]] for t in self.task_names}
        self.aux_terms = list(aux_terms)
        self.aux_modules = nn.ModuleList(
            [a.loss for a in self.aux_terms if isinstance(a.loss, nn.Module)]
        )
        self.num_processes = 1
        self.reduce_sum: Callable[[Tensor], Tensor] = lambda t: t

    def set_distributed(self, num_processes: int, reduce_sum: Callable[[Tensor], Tensor]) -> None:
        """Normalise task losses by the global label counts, all-reduced with ``reduce_sum``."""
        self.num_processes = int(num_processes)
        self.reduce_sum = reduce_sum

    def per_sample(self, task: str, preds: Tensor, targets: Tensor) -> Tensor:
        """``[n]`` loss of each (labelled) sample of ``task``: the weighted sum of its terms."""
        total = None
        for weight, loss in zip(self.loss_weights[task], self.losses[task]):
            term = weight * loss(preds, targets)
            total = term if total is None else total + term
        if total is None:
            raise ConfigError(f"tasks.{task}.loss: the task has no loss terms")
        return total

    def sample_losses(self, preds: Mapping[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        """``{task: [B]}`` per-sample losses, 0 for unlabelled samples (no gradient)."""
        with torch.no_grad():
            return {t: self._task_rows(t, preds, batch)[1] for t in self.task_names}

    def _task_rows(
        self, task: str, preds: Mapping[str, Tensor], batch: Batch
    ) -> tuple[Tensor | None, Tensor]:
        if task not in preds:
            raise ConfigError(f"the model returned no prediction for task '{task}'")
        pred = preds[task]
        mask = batch.labelled(task).to(pred.device)
        per_row = pred.new_zeros(pred.shape[0], dtype=torch.float32)
        if not bool(mask.any()):
            return None, per_row
        losses = self.per_sample(task, pred[mask], batch.targets[task][mask])
        return losses, per_row.masked_scatter(mask, losses.detach().float())

    def forward(self, batch: Batch) -> StepOutput:
        with ExitStack() as watching:  # losses of the model's activations see this forward
            for term in self.aux_terms:
                if getattr(term.loss, "needs_batch", False):
                    watching.enter_context(term.loss.watch(self.model))
            output = run_model(self.model, batch, batch.has_target)
        preds = output.preds
        device = next(iter(preds.values())).device
        counts = torch.stack([batch.labelled(t).to(device).sum() for t in self.task_names]).float()
        global_counts = self.reduce_sum(counts)
        task_losses: dict[str, Tensor] = {}
        sample_losses: dict[str, Tensor] = {}
        for i, task in enumerate(self.task_names):
            losses, sample_losses[task] = self._task_rows(task, preds, batch)
            if global_counts[i] == 0:
                continue
            local = losses.sum() if losses is not None else torch.zeros((), device=device)
            task_losses[task] = local * (self.num_processes / global_counts[i])
        aux_losses = {a.name: _aux_value(a, output, batch) for a in self.aux_terms}
        total = self.weighting(task_losses) if task_losses else torch.zeros((), device=device)
        for term in self.aux_terms:
            total = total + term.weight * aux_losses[term.name]
        if not total.requires_grad:
            total = total + sum(0.0 * p.sum() for p in preds.values() if p.requires_grad)
        return StepOutput(total, task_losses, aux_losses, sample_losses, preds, output.routing)


def _aux_value(term: AuxTerm, output: ModelOutput, batch: Batch) -> Tensor:
    """A routing loss of the records, or a loss that also needs the predictions and the batch
    (``needs_batch``, e.g. CAM-guided training, :mod:`moekit.losses.cam_guided`)."""
    if getattr(term.loss, "needs_batch", False):
        return term.loss(output.routing, preds=output.preds, batch=batch)
    return term.loss(output.routing)
