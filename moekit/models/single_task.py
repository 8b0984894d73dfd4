"""Per-task extraction at the model level: find a task by name among a model's tasks."""

from __future__ import annotations

from collections.abc import Sequence

from moekit.errors import ConfigError, did_you_mean


def task_position(task_names: Sequence[str], task: str) -> int:
    """The id of ``task`` (its position among ``task_names``); unknown names list the valid
    ones with a "did you mean"."""
    names = list(task_names)
    if task not in names:
        raise ConfigError(
            f"no task named '{task}'; valid: {', '.join(names)}{did_you_mean(str(task), names)}"
        )
    return names.index(task)
