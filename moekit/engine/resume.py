"""What a resumed run does with a config that differs from its checkpoint's.

``moekit train --resume RUN --set key=value`` trains on with the new value for real, or refuses
it; it never records a value it ignores. The run is rebuilt from the current config and then
the checkpoint's states are loaded, so every key the trainer reads at start (epochs, phase
schedules, routing losses, mixed precision, logging...) takes effect by construction; the
optimizer's hyper-parameters (learning rates, weight decay, betas, momentum...) and the
schedule's base learning rates, which the loaded states would overwrite, are put back from
the current config (:func:`reapply_hyperparameters`), so the learning rate of the next step is
exactly what an uninterrupted run with the new config would use.

Keys whose change a run cannot take mid-way are refused with a one-line error naming the key
(:data:`REFUSED`): the model and the tasks (the weights would not fit), the training data,
batch size, sampler and accumulation (the position in the epoch and the step count would lose
their meaning), the seed, the optimizer type and its parameter groups' membership (the state
holds one entry per parameter group), the weighting (its learned state), and the checkpoint
monitor (``best`` would compare different quantities); of ``train.stages``, the number of
stages, a finished stage and the current stage's optimizer type and groups
(:func:`stage_refusal`). A resumed run rebuilds the optimizer and schedule of the stage its
checkpoint was saved in before loading their states. The changes applied are logged in
``train.log`` and appended to ``config_history.jsonl`` in the run directory.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moekit.engine.rundir import json_safe
from moekit.errors import ConfigError
from moekit.fileio import atomic_write_text

REFUSED = (
    r"model(\..*)?",
    r"tasks(\..*)?",
    r"data\.(train|val|test|batch_size|drop_last|sampler)(\..*)?",
    r"train\.grad_accum",
    r"seed",
    r"optimizer\.type",
    r"optimizer\.param_groups(\.\d+)?(\.(params|name))?",
    r"weighting(\..*)?",
    r"eval\.(monitor|mode)",
)
"""Dotted keys a resumed run cannot change (see the module docstring)."""
IGNORED = (r"name", r"finetune(\..*)?")
"""Keys that say how a run started, not how it goes on."""
HISTORY_FILE = "config_history.jsonl"


def changes(saved: Any, current: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Every leaf key whose value differs between two config trees: ``{key: (old, new)}``
    (a list is compared as a whole unless both sides are lists of the same length)."""
    if isinstance(saved, Mapping) and isinstance(current, Mapping):
        found: dict[str, tuple[Any, Any]] = {}
        for key in [*saved, *(k for k in current if k not in saved)]:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            found.update(changes(saved.get(key), current.get(key), dotted))
        return found
    if isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        found = {}
        for i, (old, new) in enumerate(zip(saved, current, strict=True)):
            found.update(changes(old, new, f"{prefix}.{i}"))
        return found
    return {} if saved == current else {prefix: (saved, current)}


def stage_refusal(key: str, old: Any, new: Any, stage: int | None) -> str | None:
    """Why a resumed run in 0-based ``stage`` cannot take a change of ``train.stages``
    (None: it can).

    Refused: the number of stages (the list changed as a whole), anything of a finished stage
    (it would never be used), and the current stage's optimizer type and parameter groups (the
    loaded optimizer state holds one entry per group of that type). The current stage's
    other settings (epochs, learning rates, schedule, trainable) and every later stage's apply.
    """
    match = re.fullmatch(r"train\.stages(?:\.(\d+)(?:\.(\w+)((?:\.\w+)*))?)?", key)
    if match is None:
        return None
    index, field, rest = match.groups()
    if index is None:
        return "the number of stages"
    if stage is not None and int(index) < stage:
        return f"stage {int(index) + 1} has finished"
    if stage is not None and int(index) == stage and field == "optimizer":
        typed = any(isinstance(v, Mapping) and "type" in v for v in (old, new))
        if rest.startswith((".type", ".param_groups")) or (not rest and typed):
            return "the current stage's optimizer state belongs to its type and groups"
    return None


def check_changes(
    found: Mapping[str, tuple[Any, Any]], run: Path, stage: int | None = None
) -> dict[str, tuple[Any, Any]]:
    """The changes a resumed run applies; a refused one is a one-line :class:`ConfigError`.

    ``stage``: the 0-based stage (``train.stages``) the checkpoint's optimizer belongs to, for
    :func:`stage_refusal`."""
    applied = {}
    for key, (old, new) in found.items():
        if any(re.fullmatch(pattern, key) for pattern in IGNORED):
            continue
        reason = stage_refusal(key, old, new, stage)
        if reason is not None or any(re.fullmatch(pattern, key) for pattern in REFUSED):
            because = f"; {reason}" if reason else ""
            raise ConfigError(
                f"config key '{key}': a resumed run cannot change it ({old!r} -> {new!r})"
                f"{because}; resume {run} without it, or start a new run"
            )
        applied[key] = (old, new)
    return applied


def snapshot(optimizer: Any, scheduler: Any) -> tuple[list[dict[str, Any]], list[float]]:
    """The freshly built optimizer's group hyper-parameters and the schedule's base rates."""
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return groups, list(scheduler.scheduler.base_lrs)


def reapply_hyperparameters(
    optimizer: Any, scheduler: Any, fresh: tuple[list[dict[str, Any]], list[float]]
) -> None:
    """Put the current config's hyper-parameters back after the checkpoint's states were
    loaded, and set each group's learning rate for the schedule's step."""
    groups, base_lrs = fresh
    lambdas = scheduler.scheduler.lr_lambdas
    step = scheduler.scheduler.last_epoch
    scheduler.scheduler.base_lrs = list(base_lrs)
    for group, values, base, factor in zip(
        optimizer.param_groups, groups, base_lrs, lambdas, strict=True
    ):
        group.update({k: v for k, v in values.items() if k != "lr"})
        group["initial_lr"] = base
        group["lr"] = base * factor(step)
    scheduler.scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def record(run: Path, applied: Mapping[str, tuple[Any, Any]], state: Mapping[str, Any]) -> None:
    """Append the applied changes to the run's ``config_history.jsonl``."""
    entry = {
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "resumed_after_epoch": state.get("epoch"),
        "step": state.get("step"),
        "changes": {key: {"old": old, "new": new} for key, (old, new) in applied.items()},
    }
    file = run / HISTORY_FILE
    previous = file.read_text() if file.exists() else ""
    atomic_write_text(file, previous + json.dumps(json_safe(entry)) + "\n")
