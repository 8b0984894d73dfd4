"""Check every ``type:`` in a config against the registry its section names.

A section key decides the registry (``router`` -> ROUTERS, ``model`` -> MODELS, ``loss`` ->
TASK_LOSSES, ``data.train`` -> DATASETS, ...); the check runs before anything is built, so a
typo deep in a config fails in a second with its dotted key and a suggestion.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moekit.errors import ConfigError, RegistryError
from moekit.registry import REGISTRIES, Registry, import_builtins

SECTION_REGISTRIES: dict[str, str] = {
    "router": "ROUTERS",
    "model": "MODELS",
    "backbone": "BACKBONES",
    "head": "HEADS",
    "heads": "HEADS",
    "expert": "EXPERTS",
    "experts": "EXPERTS",
    "moe": "MOE_LAYERS",
    "aux_losses": "AUX_LOSSES",
    "weighting": "WEIGHTINGS",
    "loss": "TASK_LOSSES",
    "metrics": "METRICS",
    "transform": "TRANSFORMS",
    "transforms": "TRANSFORMS",
    "dataset": "DATASETS",
}
DATA_SPLITS = ("train", "val", "test")


def _registry_for(path: tuple[str, ...]) -> Registry | None:
    for depth in range(len(path) - 1, -1, -1):
        key = path[depth]
        if key.isdigit():
            continue
        if depth == 1 and path[0] == "data" and key in DATA_SPLITS:
            return REGISTRIES["DATASETS"]
        if key in SECTION_REGISTRIES:
            return REGISTRIES[SECTION_REGISTRIES[key]]
        return None
    return None


def _walk(node: Any, path: tuple[str, ...], source: str) -> None:
    if isinstance(node, Mapping):
        registry = _registry_for(path)
        name = node.get("type")
        if registry is not None and isinstance(name, str) and name not in registry:
            dotted = ".".join((*path, "type"))
            try:
                registry.get(name)
            except RegistryError as exc:
                raise ConfigError(f"{source}{dotted}: {exc}") from None
        for key, value in node.items():
            if isinstance(value, str) and key in SECTION_REGISTRIES:
                value = {"type": value}
            _walk(value, (*path, str(key)), source)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            if isinstance(value, str) and _registry_for(path) is not None:
                value = {"type": value}
            _walk(value, (*path, str(i)), source)


def check_types(cfg: Mapping[str, Any], source: str = "") -> None:
    """Raise a one-line :class:`ConfigError` for the first unknown ``type`` name in ``cfg``."""
    import_builtins()
    _walk(cfg, (), f"{source}: " if source else "")
