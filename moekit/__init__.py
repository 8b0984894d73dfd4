"""moekit: Mixture-of-Experts multi-task and multi-modal learning for vision and medical imaging.

The Python door (:mod:`moekit.api`): ``build_model``, ``Trainer``, ``load_run``,
``evaluate``, ``extract_task``, ``collect_usage``, ``count_flops``, ``load_artifact``;
imported on first use, so ``import moekit`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_EXPORTS = {
    "build_model": "moekit.api",
    "load_run": "moekit.api",
    "evaluate": "moekit.api",
    "extract_task": "moekit.api",
    "LoadedRun": "moekit.api",
    "load_artifact": "moekit.api",
    "Trainer": "moekit.engine.trainer",
    "collect_usage": "moekit.analysis.usage",
    "count_flops": "moekit.analysis.flops",
    "Task": "moekit.types",
    "Batch": "moekit.types",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'moekit' has no attribute '{name}'")
    return getattr(importlib.import_module(module), name)
