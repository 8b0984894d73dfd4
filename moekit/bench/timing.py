"""Timing and memory helpers shared by the ``moekit bench`` sections.

Variants are timed in one process with alternating repetitions (A, B, A, B, ...), so load that
drifts during the run hits every variant alike; ratios are paired per repetition.
"""

from __future__ import annotations

import argparse
import statistics
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def add_timing_arguments(parser: argparse.ArgumentParser, reps: int, warmup: int) -> None:
    """The options every ``moekit bench`` section takes: ``--reps``, ``--warmup``,
    ``--threads``."""
    parser.add_argument("--reps", type=int, default=reps)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--threads", type=int, default=None, help="default: all cores")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(
    fns: dict[str, Callable[[], Any]],
    reps: int,
    warmup: int,
    device: torch.device,
    before: Callable[[str], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds of each function per repetition, run in turn ``reps`` times after ``warmup``;
    ``before(name)`` runs untimed before each call."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(warmup + reps):
        for name, fn in fns.items():
            if before is not None:
                before(name)
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if rep >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def summarize(times: dict[str, list[float]], baseline: str) -> dict[str, tuple[float, float]]:
    """``(median ms, ratio)`` per function; the ratio is the median over repetitions of the
    time divided by the baseline's time in the same repetition (paired, so load that drifts
    between repetitions cancels)."""
    return {
        name: (
            statistics.median(values) * 1e3,
            statistics.median(v / b for v, b in zip(values, times[baseline], strict=True)),
        )
        for name, values in times.items()
    }


class PeakMemory(TorchDispatchMode):
    """Peak bytes of tensor storage allocated by the ops run inside the context.

    Every storage an op returns is counted once until it is freed (a weak reference on the
    storage, whose Python object lives as long as the storage). Works on any device.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self._seen:
                continue
            self._seen.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key, nbytes)
        return out
