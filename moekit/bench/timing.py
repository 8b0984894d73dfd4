"""Timing and memory helpers shared by the ``moekit bench`` sections.

Variants are timed in one process with alternating repetitions (A, B, A, B, ...), so load that
drifts during the run hits every variant alike; ratios are paired per repetition.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from moekit.errors import ConfigError

CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
"""What a repetition's time is: ``wall`` (elapsed) or ``cpu`` (the process's CPU time, every
thread's: on a machine shared with other jobs, at one thread, it leaves out the time the
scheduler gave to others; at several threads it also counts threads spinning at a barrier)."""


def add_timing_arguments(parser: argparse.ArgumentParser, reps: int, warmup: int) -> None:
    """The options every ``moekit bench`` section takes: ``--reps``, ``--warmup``,
    ``--threads``, ``--clock``."""
    parser.add_argument("--reps", type=int, default=reps)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--threads", type=int, default=None, help="default: all cores")
    parser.add_argument(
        "--clock",
        choices=list(CLOCKS),
        default="wall",
        help="wall: elapsed time (default); cpu: the process's CPU time (a busy machine, CPU)",
    )


def check_clock(clock: str, device: torch.device) -> None:
    """Raise :class:`~moekit.errors.ConfigError` for an unknown clock, or ``cpu`` on another
    device (its work is not the CPU's)."""
    if clock not in CLOCKS:
        raise ConfigError(f"--clock must be one of {', '.join(CLOCKS)}, got {clock!r}")
    if clock == "cpu" and device.type != "cpu":
        raise ConfigError(f"--clock cpu times the CPU only; on {device.type} use --clock wall")


def load_average() -> str:
    """The machine's 1-, 5- and 15-minute load averages (``"?"`` where the OS has none): the
    other work the timings shared the cores with."""
    if not hasattr(os, "getloadavg"):
        return "?"
    return " / ".join(f"{value:.1f}" for value in os.getloadavg())


DTYPES = ("float32", "bfloat16")
"""The precisions a benchmark runs in: float32, or bf16 under autocast."""

BF16_FLAGS = ("amx_bf16", "avx512_bf16")
"""CPU flags (``/proc/cpuinfo``) of bf16 matrix units: Intel AMX tiles, AVX-512 BF16 dot
products; without either, bf16 matmuls are converted to float32 and gain nothing."""


def add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    """``--dtype float32 bfloat16``: one or more precisions, measured in the same run."""
    parser.add_argument(
        "--dtype",
        nargs="+",
        choices=DTYPES,
        default=["float32"],
        help="float32 and/or bfloat16 (autocast, float32 master weights); default float32",
    )


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` for ``dtype == "bfloat16"``, nothing for ``float32``."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")


def processor_name(device: torch.device) -> str:
    """What ran the benchmark: the GPU's name, or the CPU's model name and its bf16 units."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    info = Path("/proc/cpuinfo")
    fields: dict[str, str] = {}
    for line in (info.read_text() if info.exists() else "").splitlines():
        key, colon, value = line.partition(":")
        if colon:
            fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or "unknown CPU"
    flags = fields.get("flags", "").split()
    units = [flag for flag in BF16_FLAGS if flag in flags]
    return f"{name}, bf16 units: {', '.join(units) if units else 'none'}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(
    fns: dict[str, Callable[[], Any]],
    reps: int,
    warmup: int,
    device: torch.device,
    before: Callable[[str], None] | None = None,
    clock: str = "wall",
) -> dict[str, list[float]]:
    """Seconds of each function per repetition on ``clock`` (:data:`CLOCKS`), run in turn
    ``reps`` times after ``warmup``; ``before(name)`` runs untimed before each call."""
    now = CLOCKS[clock]
    times: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(warmup + reps):
        for name, fn in fns.items():
            if before is not None:
                before(name)
            sync(device)
            start = now()
            fn()
            sync(device)
            if rep >= warmup:
                times[name].append(now() - start)
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
