"""``check_config(cfg)``: every config mistake ``moekit train`` would reject at start-up,
found before anything is built or written.

1. the config's ``imports:`` and installed plugins are imported (so their components exist);
2. every top-level key and every engine section (:mod:`moekit.sections`) is known and valid;
3. every task spec is valid;
4. every component — a ``{type: name, ...}`` mapping (or a bare name) under a key that names
   a registry — names a registered entry, and every argument it sets is one that entry
   accepts, checked against the entry's signature; the error names the dotted key;
5. the phase schedules and the stages (``train.stages``) are valid.

Which registry a component belongs to is decided by its place: the top-level sections
(``model``, ``optimizer``, ``data.train``...) and, inside components, the key that holds it
(``router`` -> ROUTERS, ``backbone`` -> BACKBONES, ``cls_expert`` -> EXPERTS...).
``moekit config check`` then builds the experiment as ``train`` does (without a run
directory), so "ok" means the run will start.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from moekit import sections
from moekit.engine.optim import ENGINE_OPTIMIZER_KEYS, ENGINE_SCHEDULER_KEYS
from moekit.engine.schedule import parse_phases, router_config
from moekit.engine.stages import parse_stages, stage_config
from moekit.errors import ConfigError
from moekit.registry import REGISTRIES, Registry, import_user_modules
from moekit.types import tasks_from_config

NESTED_REGISTRIES: dict[str, str] = {
    "router": "ROUTERS",
    "model": "MODELS",
    "backbone": "BACKBONES",
    "head": "HEADS",
    "heads": "HEADS",
    "expert": "EXPERTS",
    "experts": "EXPERTS",
    "cls_expert": "EXPERTS",
    "seg_expert": "EXPERTS",
    "moe": "MOE_LAYERS",
    "loss": "TASK_LOSSES",
    "transform": "TRANSFORMS",
    "transforms": "TRANSFORMS",
    "augment": "TRANSFORMS",
    "dataset": "DATASETS",
    "preprocess": "PREPROCESS",
}
"""Inside a component, the key that holds a nested component names its registry."""

TOP_LEVEL: dict[str, tuple[str, tuple[str, ...]]] = {
    "model": ("MODELS", ()),
    "optimizer": ("OPTIMIZERS", ENGINE_OPTIMIZER_KEYS),
    "scheduler": ("LR_SCHEDULERS", ENGINE_SCHEDULER_KEYS),
    "weighting": ("WEIGHTINGS", ()),
    "preprocess": ("PREPROCESS", ()),
}
"""Top-level component sections: (registry, keys the engine consumes besides the entry's)."""
DATASET_KEYS = ("train", "val", "test")
AUX_KEYS = ("weight", "name")
LOSS_KEYS = ("weight",)
METRIC_KEYS = ("name", "higher_is_better")


def _registry(name: str) -> Registry | None:
    return REGISTRIES.get(name)


def _as_component(node: Any) -> dict[str, Any] | None:
    if isinstance(node, str):
        return {"type": node}
    if isinstance(node, Mapping) and isinstance(node.get("type"), str):
        return dict(node)
    return None


def check_component(
    node: Any, registry: Registry | None, where: str, engine_keys: Iterable[str] = ()
) -> None:
    """Check one component (name and arguments), then the components nested in it."""
    spec = _as_component(node)
    if spec is None or registry is None:
        return
    registry.check(spec, where, provided=tuple(engine_keys))
    for key, value in spec.items():
        _walk_nested(value, key, f"{where}.{key}")


def _walk_nested(node: Any, key: str, where: str) -> None:
    registry = _registry(NESTED_REGISTRIES.get(key, ""))
    if isinstance(node, list):
        for i, item in enumerate(node):
            if registry is not None and _as_component(item) is not None:
                check_component(item, registry, f"{where}[{i}]")
            elif isinstance(item, Mapping):
                _walk_mapping(item, f"{where}[{i}]")
        return
    if registry is not None and _as_component(node) is not None:
        check_component(node, registry, where)
    elif isinstance(node, Mapping):
        _walk_mapping(node, where)


def _walk_mapping(node: Mapping[str, Any], where: str) -> None:
    for key, value in node.items():
        _walk_nested(value, str(key), f"{where}.{key}")


def check_components(cfg: Mapping[str, Any]) -> None:
    """Check every component of the config (step 4 of :func:`check_config`)."""
    for key, (registry, engine_keys) in TOP_LEVEL.items():
        check_component(sections.value(cfg, key), _registry(registry), key, engine_keys)
    data = cfg.get("data") or {}
    for split in DATASET_KEYS:
        where, engine_keys = f"data.{split}", ("seed", "preprocess")
        check_component(data.get(split), _registry("DATASETS"), where, engine_keys)
    check_component(data.get("sampler"), _registry("SAMPLERS"), "data.sampler")
    for i, entry in enumerate(cfg.get("aux_losses") or []):
        check_component(entry, _registry("AUX_LOSSES"), f"aux_losses[{i}]", AUX_KEYS)
    for name, spec in (cfg.get("tasks") or {}).items():
        losses = spec.get("loss") or []
        losses = [losses] if isinstance(losses, str | Mapping) else losses
        for i, entry in enumerate(losses):
            where = f"tasks.{name}.loss[{i}]"
            check_component(entry, _registry("TASK_LOSSES"), where, LOSS_KEYS)
        for i, entry in enumerate(spec.get("metrics") or []):
            where = f"tasks.{name}.metrics[{i}]"
            check_component(entry, _registry("METRICS"), where, METRIC_KEYS)


def check_phases(cfg: Mapping[str, Any]) -> None:
    """The routing and freeze schedules, and the router of every routing phase."""
    for i, phase in enumerate(parse_phases(cfg.get("routing_schedule"), "routing_schedule")):
        where = f"routing_schedule[{i}]"
        router, _ = router_config(phase, where)
        check_component(router, _registry("ROUTERS"), f"{where}.router")
    parse_phases(cfg.get("freeze_schedule"), "freeze_schedule")
    for stage in parse_stages(cfg):  # also checks train.epochs against the stages
        staged = stage_config(cfg, stage)
        for key in ("optimizer", "scheduler"):
            registry, engine_keys = TOP_LEVEL[key]
            check_component(staged[key], _registry(registry), f"{stage.key}.{key}", engine_keys)


def check_config(cfg: Mapping[str, Any], source: str = "") -> None:
    """Raise a one-line :class:`ConfigError` for the first mistake in ``cfg`` (prefixed with
    ``source``, the file, when given)."""
    try:
        import_user_modules(cfg)
        sections.check(cfg)
        tasks_from_config(cfg)
        check_components(cfg)
        check_phases(cfg)
    except ConfigError as exc:
        if source:
            raise ConfigError(f"{source}: {exc}") from None
        raise
