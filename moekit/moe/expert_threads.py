"""Run expert blocks side by side on single-threaded worker threads (CPU).

One expert's block at the ViT-S MoE-MLP shape (about 400 rows of 384 × 384 matmuls) is too
small to keep several cores busy: every op of the block is one OpenMP parallel region, and each
region ends in a barrier that waits for the slowest thread, hundreds of times per step. When
another process holds one of the cores the barrier waits for the scheduler to bring the
preempted thread back, and the step takes several times as long (measured in ``docs/
performance.md``). Running whole blocks concurrently instead, on ``T`` worker threads that each
use one intra-op thread, needs one join per step, leaves no core idle inside a block, and
overlaps one worker's Python loop with the other's kernels (ops release the GIL).

The workers are a process-wide pool per worker count. A worker's intra-op thread count is
per-thread state in PyTorch's OpenMP build: the worker sets it to 1 once, while the process-wide
default is still 1, and the calling thread then restores the default; the pool is used only if
every worker then reports 1 thread, else blocks run in turn as before.

Measured at the ViT-S MoE-MLP shape on two cores (``docs/performance.md``): with one core taken
by another process the workers make the forward+backward 3.1× faster than blocks in turn; on an
idle machine blocks in turn are about 15 % faster. The workers are the default, the robust
choice; ``MOEKIT_EXPERT_WORKERS=off`` (environment) runs blocks in turn on a machine that is
yours alone.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

Block = TypeVar("Block")
Result = TypeVar("Result")

MIN_BLOCKS_PER_WORKER = 2
"""Blocks are run side by side only with at least this many per worker (load balance)."""

_pools: dict[int, ThreadPoolExecutor | None] = {}
_lock = threading.Lock()
os.register_at_fork(after_in_child=_pools.clear)  # a forked child has no pool threads
_in_turn = threading.local()


@contextmanager
def in_turn() -> Iterator[None]:
    """Run blocks one after the other in the calling thread inside the context (``moekit bench
    moe`` times the loop dispatch both ways)."""
    previous = getattr(_in_turn, "on", False)
    _in_turn.on = True
    try:
        yield
    finally:
        _in_turn.on = previous


def num_workers(device: torch.device, num_blocks: int) -> int:
    """How many workers run ``num_blocks`` blocks: the intra-op thread count ``T`` on the CPU
    when ``T > 1``, there are at least ``2T`` blocks and the workers are enabled
    (:func:`workers_enabled`), else 1 (blocks in turn, each op using every thread). Always 1
    under a torch function or dispatch mode (a FLOP counter, a memory tracker: modes are per
    thread and would not see the workers' ops), while compiling, and inside :func:`in_turn`."""
    if device.type != "cpu" or _in_mode() or torch.compiler.is_compiling():
        return 1
    if getattr(_in_turn, "on", False) or not workers_enabled():
        return 1
    threads = torch.get_num_threads()
    return threads if threads > 1 and num_blocks >= MIN_BLOCKS_PER_WORKER * threads else 1


WORKERS_ENV = "MOEKIT_EXPERT_WORKERS"
"""Environment variable: ``on`` (default) or ``off`` (expert blocks always in turn)."""


def workers_enabled() -> bool:
    """Whether expert blocks may run on workers: ``MOEKIT_EXPERT_WORKERS`` is ``on`` (or unset)
    or ``off``; any other value is a :class:`ValueError` naming the variable."""
    value = os.environ.get(WORKERS_ENV, "on").strip().lower()
    if value not in ("on", "off"):
        raise ValueError(f"environment variable {WORKERS_ENV}={value!r}: expected 'on' or 'off'")
    return value == "on"


def _in_mode() -> bool:
    return torch._C._len_torch_dispatch_stack() > 0 or torch._C._len_torch_function_stack() > 0


def balance(sizes: Sequence[int], workers: int) -> list[list[int]]:
    """Split block indices into ``workers`` lists of about equal total size (largest first to
    the least loaded worker); each list keeps the blocks' order."""
    bins: list[list[int]] = [[] for _ in range(workers)]
    load = [0] * workers
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        w = load.index(min(load))
        bins[w].append(i)
        load[w] += sizes[i]
    return [sorted(b) for b in bins]


def run_blocks(
    fn: Callable[[list[Block]], Result],
    blocks: Sequence[Block],
    sizes: Sequence[int],
    workers: int,
) -> list[Result]:
    """``fn`` on ``workers`` balanced parts of ``blocks`` (``sizes``: their costs), side by side
    with gradients off; ``[fn(blocks)]`` in this thread when ``workers`` is 1 or no pool could
    be started. ``fn`` must write only to memory no other part writes to."""
    pool = _pool(workers) if workers > 1 else None
    if pool is None:
        return [fn(list(blocks))]

    def call(part: list[Block]) -> Result:
        with torch.no_grad():
            return fn(part)

    parts = [[blocks[i] for i in indices] for indices in balance(sizes, workers)]
    return [future.result() for future in [pool.submit(call, part) for part in parts]]


def _pool(workers: int) -> ThreadPoolExecutor | None:
    with _lock:
        if workers not in _pools:
            _pools[workers] = _start_pool(workers)
        return _pools[workers]


def _start_pool(workers: int) -> ThreadPoolExecutor | None:
    pool = ThreadPoolExecutor(workers, thread_name_prefix="moekit-experts")
    default = torch.get_num_threads()
    started, restored = threading.Barrier(workers + 1), threading.Barrier(workers + 1)

    def one_thread() -> int:
        torch.set_num_threads(1)
        torch.get_num_threads()  # this thread's OpenMP and MKL settings are made now, at 1
        started.wait()
        restored.wait()
        return torch.get_num_threads()

    futures = [pool.submit(one_thread) for _ in range(workers)]
    started.wait()
    torch.set_num_threads(default)
    restored.wait()
    if all(future.result() == 1 for future in futures):
        return pool
    pool.shutdown()
    return None
