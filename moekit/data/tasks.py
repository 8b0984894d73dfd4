"""Checks shared by the datasets that return a chosen subset of their tasks."""

from __future__ import annotations

from collections.abc import Sequence

from moekit.errors import ConfigError, did_you_mean


def check_tasks(dataset: str, tasks: Sequence[str], valid: Sequence[str]) -> list[str]:
    """``tasks`` as a list, after checking it is a non-empty subset of ``valid`` without repeats.

    ``dataset`` (the registry name) starts every error message; an unknown task is named with
    the valid ones and the closest match.
    """
    if isinstance(tasks, str):
        raise ConfigError(f"{dataset}: tasks must be a list of task names, got '{tasks}'")
    tasks = list(tasks)
    for name in tasks:
        if name not in valid:
            raise ConfigError(
                f"{dataset}: unknown task '{name}'; valid: {', '.join(valid)}"
                f"{did_you_mean(str(name), valid)}"
            )
    if not tasks or len(set(tasks)) != len(tasks):
        raise ConfigError(f"{dataset}: tasks must be a non-empty list without repeats, got {tasks}")
    return tasks
