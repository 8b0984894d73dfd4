"""What stops a training loop early: a non-finite loss and a SIGTERM.

- :class:`NonFiniteWatch` notes, on the device, the first step whose loss is NaN or infinite,
  without a host synchronisation per step; the trainer looks at it when it synchronises anyway
  (the log lines every ``train.log_every`` steps and the end of the epoch), before anything is
  saved, so the last checkpoint stays the last good one.
- :class:`SigtermFlag` turns SIGTERM (what a cluster scheduler sends before it preempts a job)
  into a flag the loop reads after each optimizer step: the trainer then saves a checkpoint
  that resumes exactly and stops (:class:`~moekit.errors.Preempted`).
"""

from __future__ import annotations

import math
import signal
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

import torch
from torch import Tensor

from moekit.errors import TrainingError


class NonFiniteWatch:
    """The first (step, batch, loss) at which a watched loss was not finite, kept on the
    device: :meth:`observe` never synchronises, :meth:`check` does."""

    def __init__(self, names: Sequence[str], device: torch.device) -> None:
        self.names = list(names)
        self.first = torch.full((3,), -1, dtype=torch.long, device=device)
        self.value = torch.zeros((), device=device)

    def observe(self, losses: Tensor, step: int, batch: int) -> None:
        """Note ``losses`` (one value per name) of ``step``, the ``batch``-th of its epoch."""
        bad = ~torch.isfinite(losses)
        which = bad.int().argmax()
        new = (self.first[0] < 0) & bad.any()
        where = torch.stack([torch.full_like(which, step), torch.full_like(which, batch), which])
        self.first = torch.where(new, where, self.first)
        self.value = torch.where(new, losses[which].float(), self.value)

    def check(self, reduce_sum: Callable[[Tensor], Tensor], epoch: int, saved_epoch: int) -> None:
        """Raise :class:`TrainingError` (on every process at once) if any process saw a
        non-finite loss."""
        found = reduce_sum((self.first[:1] >= 0).float())
        if not bool(found.item()):
            return
        step, batch, which = (int(v) for v in self.first.tolist())
        if step < 0:
            what = "non-finite loss on another process"
        else:
            value = float(self.value)
            what = (
                f"non-finite loss at step {step} (epoch {epoch + 1}, batch {batch + 1}): "
                f"{self.names[which]} loss is {value if not math.isfinite(value) else 'non-finite'}"
            )
        raise TrainingError(f"{what}; stopped, checkpoints/last holds epoch {saved_epoch}")


class SigtermFlag:
    """A context in which SIGTERM sets :attr:`raised` instead of ending the process (the
    previous handler is put back on exit; outside the main thread nothing is installed)."""

    def __init__(self) -> None:
        self.raised = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.raised = True

    def __enter__(self) -> SigtermFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
