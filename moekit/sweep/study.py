"""A study: one YAML file in ``experiments/`` describing an ablation (docs/experiments.md).

A study names a base config, the variants to compare (each a list of ``--set`` overrides, a
config of its own, or a per-task extraction of another variant's run), an optional grid whose
cartesian product multiplies the variants, the seeds every variant repeats with, and the columns
of its results table. ``profiles`` hold other forms of the same study (a CPU form that finishes
in minutes, a GPU form at the paper's scale), chosen with ``moekit sweep --profile NAME``::

    name: idrid_routing
    base: ../configs/idrid/mtl_r50_topp.yaml
    variants:
      dense: [routing_schedule=[]]
      top_p: []
    grid: {model.num_experts: [1, 3, 5]}
    seeds: [0, 1]
    columns:
      rg acc: {metric: rg/accuracy}
      experts: experts_selected
    profiles:
      cpu: {fragments: [../configs/idrid/_cpu.yaml], set: [train.epochs=4]}

Each variant's config is ``base`` (or the variant's own ``base``), then every ``fragments``
file merged over it, then the study's ``set``, the profile's ``set``, the variant's ``set`` and
``seed=<seed>``. Paths are relative to the study file.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moekit import config as config_io
from moekit.errors import ConfigError, did_you_mean
from moekit.schema import Field, Section

STUDY_KEYS = (
    "name",
    "description",
    "base",
    "fragments",
    "set",
    "seeds",
    "evaluate",
    "output_dir",
    "variants",
    "grid",
    "columns",
    "profiles",
)
PROFILE_KEYS = ("description", "base", "fragments", "set", "seeds", "variants", "evaluate")
VARIANT_KEYS = ("description", "base", "fragments", "set", "prune")
PRUNE_KEYS = ("from", "task", "threshold", "keep_top", "reduce_k")
EVALUATE_DEFAULTS: dict[str, Any] = {"split": "test", "checkpoint": "best", "profile_split": "val"}
COLUMN_KINDS: dict[str, bool | None] = {
    "metric": None,
    "experts_selected": None,
    "mutual_information": None,
    "flops": False,
    "params": False,
    "active_params": False,
    "pruned_params": False,
    "delta": True,
}
"""Column kinds and the direction of each (``None``: the metric's own, or no best value)."""
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.=,+%-]+$")


def _check_keys(node: Mapping[str, Any], valid: Sequence[str], where: str) -> None:
    """Unknown keys are the same error as in an experiment config (:class:`Section`), after
    ``where`` (the study file and the mapping's key)."""
    try:
        Section("", {key: Field() for key in valid}).check_keys(node)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _mapping(node: Any, where: str) -> dict[str, Any]:
    if node is None:
        return {}
    if not isinstance(node, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {node!r}")
    return dict(node)


def _overrides(node: Any, where: str) -> tuple[str, ...]:
    if node is None:
        return ()
    if isinstance(node, str):
        node = [node]
    if not isinstance(node, list) or not all(isinstance(v, str) for v in node):
        raise ConfigError(f"{where}: expected a list of key=value overrides, got {node!r}")
    for text in node:
        config_io.parse_override(text)
    return tuple(node)


def _paths(node: Any, root: Path, where: str) -> tuple[Path, ...]:
    if node is None:
        return ()
    items = [node] if isinstance(node, str) else node
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise ConfigError(f"{where}: expected a path or a list of paths, got {node!r}")
    paths = tuple((root / v).resolve() for v in items)
    for text, path in zip(items, paths, strict=True):
        if not path.is_file():
            raise ConfigError(f"{where}: config file '{text}' not found (looked at {path})")
    return paths


@dataclass(frozen=True)
class PruneSpec:
    """A variant that extracts ``task`` from the run of variant ``source`` (same seed)."""

    source: str
    task: str
    threshold: float | None = None
    keep_top: float | None = None
    reduce_k: bool = False


@dataclass(frozen=True)
class Variant:
    """One row of the results table: a config (or an extraction) to run with every seed."""

    name: str
    description: str = ""
    base: Path | None = None
    fragments: tuple[Path, ...] = ()
    overrides: tuple[str, ...] = ()
    prune: PruneSpec | None = None

    def config(self, seed: int, extra: Sequence[str] = ()) -> dict[str, Any]:
        """The resolved config of this variant's run with ``seed``."""
        if self.base is None:
            raise ConfigError(f"variant '{self.name}' is an extraction and has no config")
        cfg = config_io.load_stack([self.base, *self.fragments])
        cfg = config_io.apply_overrides(cfg, [*self.overrides, *extra])
        return {**cfg, "seed": seed, "name": self.name}


@dataclass(frozen=True)
class Column:
    """A column of the results table: ``kind`` with its argument, and its direction."""

    label: str
    kind: str
    arg: Any = None
    higher_is_better: bool | None = None

    def key(self) -> str:
        """A stable identifier of what the column measures (its cache key)."""
        return f"{self.kind}:{json.dumps(self.arg, sort_keys=True)}"


@dataclass(frozen=True)
class Study:
    """A parsed study file (see the module docstring)."""

    name: str
    path: Path
    profile: str | None
    directory: Path
    variants: tuple[Variant, ...]
    seeds: tuple[int, ...]
    columns: tuple[Column, ...]
    evaluate: dict[str, Any] = field(default_factory=lambda: dict(EVALUATE_DEFAULTS))
    description: str = ""

    def variant(self, name: str) -> Variant:
        for variant in self.variants:
            if variant.name == name:
                return variant
        names = [v.name for v in self.variants]
        raise ConfigError(
            f"{self.path}: no variant '{name}'{did_you_mean(name, names)}; "
            f"variants: {', '.join(names)}"
        )

    def run_dir(self, variant: str, seed: int) -> Path:
        """Where the run of ``variant`` with ``seed`` lives."""
        return self.directory / variant / f"seed-{seed}"

    def runs(self) -> list[tuple[Variant, int, Path]]:
        """Every (variant, seed, run directory), sources before the extractions that use them."""
        return [(v, s, self.run_dir(v.name, s)) for v in self.variants for s in self.seeds]


def _parse_prune(node: Any, where: str, known: Sequence[str]) -> PruneSpec:
    node = _mapping(node, where)
    _check_keys(node, PRUNE_KEYS, where)
    source, task = node.get("from"), node.get("task")
    if source not in known:
        raise ConfigError(
            f"{where}.from: '{source}' is not an earlier variant{did_you_mean(str(source), known)}"
            f"; earlier variants: {', '.join(known) or '(none)'}"
        )
    if not isinstance(task, str):
        raise ConfigError(f"{where}.task: expected the name of the task to extract")
    from moekit.analysis.extraction import check_rule

    threshold, keep_top = node.get("threshold"), node.get("keep_top")
    try:
        check_rule(threshold, keep_top)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return PruneSpec(str(source), task, threshold, keep_top, bool(node.get("reduce_k", False)))


def _grid_overrides(grid: Mapping[str, Any], where: str) -> list[tuple[str, tuple[str, ...]]]:
    """``[(name, overrides)]`` of the cartesian product of ``{key: [values]}``."""
    axes = []
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.{key}: expected a non-empty list of values")
        axes.append([(key, value) for value in values])
    combos = []
    for combo in itertools.product(*axes):
        name = ",".join(f"{key.rsplit('.', 1)[-1]}={_short(value)}" for key, value in combo)
        overrides = tuple(f"{key}={json.dumps(value)}" for key, value in combo)
        combos.append((name, overrides))
    return combos


def _short(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def _parse_variants(
    raw: Mapping[str, Any],
    grid: Mapping[str, Any],
    defaults: dict[str, Any],
    root: Path,
    where: str,
) -> tuple[Variant, ...]:
    if not raw and not grid:
        raise ConfigError(f"{where}: a study needs 'variants' or a 'grid'")
    combos = _grid_overrides(grid, f"{where}.grid") if grid else [("", ())]
    variants: list[Variant] = []
    for name, node in raw.items() if raw else [("", None)]:
        vwhere = f"{where}.variants.{name}"
        if isinstance(node, list | str) or node is None:
            node = {"set": node}
        node = _mapping(node, vwhere)
        _check_keys(node, VARIANT_KEYS, vwhere)
        prune = node.get("prune")
        for suffix, grid_set in combos:
            full = "-".join(part for part in (str(name), suffix) if part)
            if not NAME_PATTERN.match(full):
                raise ConfigError(
                    f"{vwhere}: variant name '{full}' must use letters, digits and _ . = , + % -"
                )
            if any(v.name == full for v in variants):
                raise ConfigError(f"{vwhere}: variant '{full}' is defined twice")
            if prune is not None:
                if grid_set or "set" in node or "base" in node:
                    raise ConfigError(f"{vwhere}: an extraction takes no base, set or grid")
                spec = _parse_prune(prune, f"{vwhere}.prune", [v.name for v in variants])
                variants.append(Variant(full, str(node.get("description", "")), prune=spec))
                continue
            base = _paths(node["base"], root, f"{vwhere}.base") if "base" in node else None
            fragments = _paths(node.get("fragments"), root, f"{vwhere}.fragments")
            variants.append(
                Variant(
                    full,
                    str(node.get("description", "")),
                    base=base[0] if base else defaults["base"],
                    fragments=(*defaults["fragments"], *fragments),
                    overrides=(
                        *defaults["set"],
                        *_overrides(node.get("set"), f"{vwhere}.set"),
                        *grid_set,
                    ),
                )
            )
            if variants[-1].base is None:
                raise ConfigError(f"{vwhere}: no base config (set the study's or the variant's)")
    return tuple(variants)


def _parse_columns(raw: Any, where: str) -> tuple[Column, ...]:
    columns = []
    for label, spec in _mapping(raw, where).items():
        cwhere = f"{where}.{label}"
        if isinstance(spec, str):
            spec = {spec: None}
        spec = _mapping(spec, cwhere)
        direction = spec.pop("higher_is_better", None)
        kinds = [k for k in spec if k in COLUMN_KINDS]
        unknown = [k for k in spec if k not in COLUMN_KINDS]
        if unknown or len(kinds) != 1:
            bad = unknown[0] if unknown else ", ".join(kinds) or "(none)"
            raise ConfigError(
                f"{cwhere}: expected one column kind, got '{bad}'"
                f"{did_you_mean(bad, COLUMN_KINDS) if unknown else ''}; "
                f"valid: {', '.join(COLUMN_KINDS)}"
            )
        kind = kinds[0]
        arg = spec[kind]
        if kind == "metric" and not isinstance(arg, str):
            raise ConfigError(f"{cwhere}.metric: expected 'task/metric' (or 'loss')")
        if kind == "delta":
            arg = _mapping(arg, f"{cwhere}.delta")
            if not _mapping(arg.get("baselines"), f"{cwhere}.delta.baselines"):
                raise ConfigError(f"{cwhere}.delta.baselines: expected {{task/metric: variant}}")
        if kind == "pruned_params":
            arg = {"threshold": 0.01, "task": None, **_mapping(arg, f"{cwhere}.pruned_params")}
        default = COLUMN_KINDS[kind]
        columns.append(
            Column(str(label), kind, arg, default if direction is None else bool(direction))
        )
    if not columns:
        raise ConfigError(f"{where}: a study needs at least one column")
    return tuple(columns)


def _apply_profile(data: dict[str, Any], profile: str | None, where: str) -> dict[str, Any]:
    profiles = _mapping(data.pop("profiles", None), f"{where}.profiles")
    if profile is None:
        return data
    if profile not in profiles:
        raise ConfigError(
            f"{where}: no profile '{profile}'{did_you_mean(profile, profiles)}; "
            f"profiles: {', '.join(profiles) or '(none)'}"
        )
    chosen = _mapping(profiles[profile], f"{where}.profiles.{profile}")
    _check_keys(chosen, PROFILE_KEYS, f"{where}.profiles.{profile}")
    merged = dict(data)
    for key, value in chosen.items():
        if key in ("set", "fragments"):
            previous = data.get(key) or []
            merged[key] = [*([previous] if isinstance(previous, str) else previous), *value]
        elif key in ("variants", "evaluate"):
            merged[key] = config_io.deep_merge(_mapping(data.get(key), key), _mapping(value, key))
        else:
            merged[key] = value
    return merged


def load_study(
    path: str | Path, profile: str | None = None, output_dir: str | Path | None = None
) -> Study:
    """Parse and check a study file (a shipped one by ``experiments/NAME.yaml`` from any
    directory); every error names the file and the key."""
    path = config_io.shipped_path(path).resolve()
    where = str(path)
    data = _apply_profile(config_io.read_yaml(path), profile, where)
    _check_keys(data, STUDY_KEYS, where)
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ConfigError(f"{where}: name '{name}' must use letters, digits and _ . = , + % -")
    root = path.parent
    base = _paths(data.get("base"), root, f"{where}.base")
    defaults = {
        "base": base[0] if base else None,
        "fragments": _paths(data.get("fragments"), root, f"{where}.fragments"),
        "set": _overrides(data.get("set"), f"{where}.set"),
    }
    variants = _parse_variants(
        _mapping(data.get("variants"), f"{where}.variants"),
        _mapping(data.get("grid"), f"{where}.grid"),
        defaults,
        root,
        where,
    )
    seeds = data.get("seeds", [0])
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    ):
        raise ConfigError(f"{where}.seeds: expected a non-empty list of ints, got {seeds!r}")
    evaluate = _mapping(data.get("evaluate"), f"{where}.evaluate")
    _check_keys(evaluate, tuple(EVALUATE_DEFAULTS), f"{where}.evaluate")
    columns = _parse_columns(data.get("columns"), f"{where}.columns")
    names = [v.name for v in variants]
    for column in columns:
        if column.kind == "delta":
            for key, source in column.arg["baselines"].items():
                if source not in names:
                    raise ConfigError(
                        f"{where}.columns.{column.label}.delta.baselines.{key}: '{source}' is "
                        f"not a variant{did_you_mean(str(source), names)}"
                    )
    output = Path(output_dir if output_dir is not None else data.get("output_dir", "runs/studies"))
    directory = output / (name if profile is None else f"{name}-{profile}")
    return Study(
        name=name,
        path=path,
        profile=profile,
        directory=directory,
        variants=variants,
        seeds=tuple(seeds),
        columns=columns,
        evaluate={**EVALUATE_DEFAULTS, **evaluate},
        description=str(data.get("description", "")),
    )
