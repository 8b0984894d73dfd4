"""The ``Accelerator`` of a run, for one process or many (torchrun / accelerate launch)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (
    DistributedDataParallelKwargs,
    ProjectConfiguration,
    broadcast_object_list,
    is_tensorboard_available,
)

from moekit.errors import ConfigError


def intra_op_threads(requested: int | None) -> int:
    """The intra-op CPU threads of this process: ``train.num_threads``, else
    ``OMP_NUM_THREADS`` when set, else the CPUs this process may run on shared among the
    processes a launcher started on this machine (``LOCAL_WORLD_SIZE``; torchrun also sets
    ``OMP_NUM_THREADS=1`` unless told otherwise). On a machine shared with other jobs, fewer
    threads than cores is faster (docs/training.md, "Threads")."""
    if requested is not None:
        return int(requested)
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cpus or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def use_cpu(train: Mapping[str, Any]) -> bool:
    """``train.device: cpu``, or ``auto`` on a machine without an accelerator."""
    return train["device"] == "cpu" or not torch.accelerator.is_available()


def uses_cpu(cfg: Mapping[str, Any]) -> bool:
    """Whether the config's run trains on the CPU (:func:`use_cpu` of its ``train``)."""
    from moekit.sections import settings

    return use_cpu(settings(cfg, "train"))


def agree_on_path(path: Path | None, make: Any, cpu: bool) -> Path:
    """The run directory all processes use: ``path``, or ``make()`` on the main process."""
    state = PartialState(cpu=cpu)
    chosen = [str(path) if path is not None else (str(make()) if state.is_main_process else "")]
    if state.num_processes > 1:
        broadcast_object_list(chosen)
    return Path(chosen[0])


def fresh_accelerator_state() -> None:
    """Let the next Accelerator of this process take its own settings.

    accelerate keeps one process-wide ``AcceleratorState``, so a second Accelerator with another
    ``mixed_precision`` (a sweep, or ``moekit results`` over an fp16 and an fp32 run) raises. In
    a single process the state is dropped before each new Accelerator (the process group,
    ``PartialState``, is kept); under a multi-process launch nothing is reset.
    """
    from accelerate.state import AcceleratorState

    if PartialState._shared_state and PartialState().num_processes > 1:
        return
    AcceleratorState._reset_state(reset_partial_state=False)


def make_accelerator(train: Mapping[str, Any], project_dir: Path | None = None) -> Accelerator:
    """An ``Accelerator`` configured by the ``train`` section.

    The LR scheduler is stepped by the trainer once per optimizer step (not once per process,
    accelerate's default), so schedules are the same for any number of processes. DDP is told
    to find unused parameters unless ``train.find_unused_parameters: false``: per-task heads
    and routers that a batch does not use have no gradient in that step.
    """
    log_with = train["log_with"]
    if log_with == "tensorboard" and not is_tensorboard_available():
        raise ConfigError(
            "config key 'train.log_with': tensorboard is not installed (pip install tensorboard)"
        )
    project = None
    if project_dir is not None:
        project = ProjectConfiguration(
            project_dir=str(project_dir), logging_dir=str(project_dir / "tensorboard")
        )
    torch.set_num_threads(intra_op_threads(train["num_threads"]))
    fresh_accelerator_state()
    return Accelerator(
        cpu=use_cpu(train),
        mixed_precision=train["mixed_precision"],
        gradient_accumulation_steps=train["grad_accum"],
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[
            DistributedDataParallelKwargs(
                find_unused_parameters=bool(train["find_unused_parameters"])
            )
        ],
        log_with=log_with,
        project_config=project,
    )
