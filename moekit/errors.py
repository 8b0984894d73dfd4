"""Exceptions for user errors.

Every error a researcher can cause with a config, a file or a command-line argument is a
:class:`MoekitError`. The CLI prints its message as one line and exits with status 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MoekitError(Exception):
    """A user error: bad config, unknown name, missing or malformed file."""


class ConfigError(MoekitError):
    """A config file, key or value is wrong."""


class RegistryError(ConfigError):
    """A registry name or a constructor argument is wrong."""


class DataError(MoekitError):
    """A dataset on disk is missing, malformed or inconsistent."""


class CheckpointError(MoekitError):
    """A checkpoint is missing, unreadable or does not match the model."""


class TrainingError(MoekitError):
    """Training cannot go on (for example a non-finite loss)."""


class Preempted(TrainingError):
    """Training stopped on SIGTERM after saving a checkpoint that resumes exactly."""


class WriteError(MoekitError):
    """A file could not be written (disk full, read-only, permissions); nothing was replaced."""


class BusyError(MoekitError):
    """Another moekit process owns the run directory."""


def did_you_mean(word: str, choices: Iterable[str], n: int = 3) -> str:
    """Return ``"; did you mean 'x'?"`` for the closest choices, or ``""`` when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=n, cutoff=0.5)
    if not close:
        return ""
    return "; did you mean " + " or ".join(f"'{c}'" for c in close) + "?"
