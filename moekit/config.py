"""YAML configs with ``_base_`` inheritance, deep merge and dotted overrides.

The config language (docs/configs.md):

- A file may name one or more base files, ``_base_: ../base.yaml`` or a list, relative to the
  file itself, or shipped configs by name (``_base_: tiny/two_task``). Bases are merged in
  order, then the file's own keys on top.
- Merging is deep for mappings; lists and scalars are replaced. A mapping that holds
  ``_replace_: true`` replaces the inherited mapping instead of merging into it (use it to swap a
  component, e.g. a router of another type whose arguments differ).
- Overrides ``a.b.c=value`` (``--set`` on the command line) change an existing key; the value
  is parsed as YAML (``3`` is an int, ``[1, 2]`` a list, ``null`` None). A key moekit documents
  (:mod:`moekit.sections`: ``train.curves``, ``deterministic``...) can be set where the file
  does not write it; any other key that does not exist is an error naming the closest existing
  keys, and ``+a.b.c=value`` adds it.
- The resolved config (a plain dict) is saved beside every run with :func:`save`.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from moekit.errors import ConfigError, did_you_mean
from moekit.fileio import atomic_write_text
from moekit.sections import documented

SHIPPED_ROOT = Path(__file__).resolve().parent
"""The installed ``moekit`` package: its shipped ``configs/`` and ``experiments/`` are package
data inside it (a checkout links them from its top level)."""
SHIPPED_CONFIGS = SHIPPED_ROOT / "configs"
BASE_KEY = "_base_"
REPLACE_KEY = "_replace_"


YAML12_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
"""YAML 1.2 floats: ``3e-4`` is a float (YAML 1.1, PyYAML's default, needs ``3.0e-4``)."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats, so ``lr: 3e-4`` is a float, not a string."""


class _Dumper(yaml.SafeDumper):
    """PyYAML's safe dumper that knows YAML 1.2 floats, so it quotes the string ``"1e3"``."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", YAML12_FLOAT, list("-+0123456789."))


def shipped_path(path: str | Path) -> Path:
    """``path`` as given when it exists (relative to the current directory), else the shipped
    file it names (:func:`shipped_file`), so shipped configs work from any directory of an
    installed moekit; unchanged when none exists (the caller's error then names it)."""
    path = Path(path)
    if path.exists() or path.is_absolute():
        return path
    return shipped_file(path) or path


def shipped_file(path: str | Path) -> Path | None:
    """The shipped file ``path`` names, or ``None``: ``configs/idrid/demo.yaml`` or
    ``experiments/idrid_routing.yaml`` (a path inside the package), or a config's name
    ``idrid/demo`` (``moekit configs`` lists them)."""
    path = Path(path)
    inside = SHIPPED_ROOT / path if path.parts[:1] in (("configs",), ("experiments",)) else None
    named = SHIPPED_CONFIGS / (path if path.suffix in (".yaml", ".yml") else f"{path}.yaml")
    for shipped in (inside, named):
        if shipped is not None and shipped.is_file():
            return shipped
    return None


def parse_yaml(text: str) -> Any:
    """Parse YAML text with the config loader (YAML 1.2 floats)."""
    return yaml.load(text, Loader=_Loader)


def deep_merge(
    base: Mapping[str, Any], override: Mapping[str, Any], keep_markers: bool = False
) -> dict[str, Any]:
    """Return ``base`` updated recursively by ``override`` (neither input is modified).

    Mappings merge key by key; any other value in ``override`` replaces the one in ``base``.
    A mapping in ``override`` with ``_replace_: true`` replaces instead of merging. With
    ``keep_markers`` the markers stay in the result, so that a file's tree still replaces what
    it is merged over later (a fragment listed after another in ``_base_``).
    """
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping):
            value = dict(value)
            replace = bool(value.pop(REPLACE_KEY, False))
            if not replace and isinstance(merged.get(key), Mapping):
                merged[key] = deep_merge(merged[key], value, keep_markers)
                continue
            if keep_markers:
                merged[key] = copy.deepcopy({REPLACE_KEY: True, **value} if replace else value)
            else:
                merged[key] = strip_replace_markers(value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def strip_replace_markers(node: Any) -> Any:
    """Remove ``_replace_`` keys left in a subtree that had nothing to replace."""
    if isinstance(node, Mapping):
        return {k: strip_replace_markers(v) for k, v in node.items() if k != REPLACE_KEY}
    if isinstance(node, list):
        return [strip_replace_markers(v) for v in node]
    return copy.deepcopy(node)


def read_yaml(path: Path) -> dict[str, Any]:
    """Parse one YAML file into a dict; errors name the file (and line where YAML knows it)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: config file not found (`moekit configs` lists the shipped configs)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}:{where} invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a config must be a mapping at top level, got {type(data).__name__}"
        )
    return data


def _load_tree(path: Path, stack: tuple[Path, ...]) -> dict[str, Any]:
    path = path.resolve()
    if path in stack:
        cycle = " -> ".join(str(p) for p in (*stack, path))
        raise ConfigError(f"{path}: _base_ cycle: {cycle}")
    data = read_yaml(path)
    bases = data.pop(BASE_KEY, None) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: _base_ must be a path or a list of paths, got {bases!r}")
    merged: dict[str, Any] = {}
    for base in bases:
        base_path = path.parent / base
        if not base_path.is_file():
            base_path = shipped_file(base) or base_path
        if not base_path.is_file():
            raise ConfigError(
                f"{path}: _base_ file '{base}' not found (looked at {path.parent / base} and "
                "the shipped configs)"
            )
        merged = deep_merge(merged, _load_tree(base_path, (*stack, path)), keep_markers=True)
    return deep_merge(merged, data, keep_markers=True)


def load(path: str | Path, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Load a config file with its bases and apply ``key=value`` overrides."""
    return load_stack([path], overrides)


def load_stack(paths: Iterable[str | Path], overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Merge config files in order, as a file whose ``_base_`` lists them would (so a later
    fragment's ``_replace_`` applies), then apply ``key=value`` overrides."""
    merged: dict[str, Any] = {}
    for path in paths:
        merged = deep_merge(merged, _load_tree(shipped_path(path), ()), keep_markers=True)
    return apply_overrides(strip_replace_markers(merged), overrides)


def flat_keys(node: Any, prefix: str = "") -> list[str]:
    """Every dotted key path in a nested dict (mapping keys and list indices)."""
    keys: list[str] = []
    if isinstance(node, Mapping):
        items: Iterable[tuple[Any, Any]] = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return keys
    for key, value in items:
        dotted = f"{prefix}{key}"
        keys.append(dotted)
        keys.extend(flat_keys(value, dotted + "."))
    return keys


def parse_override(text: str) -> tuple[str, Any, bool]:
    """Split ``[+]a.b=value`` into (key, YAML-parsed value, whether the key may be new)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    add = key.startswith("+")
    key = key.lstrip("+")
    if not sep or not key or any(part == "" for part in key.split(".")):
        raise ConfigError(f"override '{text}': expected key=value, e.g. train.epochs=3")
    try:
        value = parse_yaml(raw) if raw.strip() else raw
    except yaml.YAMLError:
        raise ConfigError(f"override '{text}': value '{raw}' is not valid YAML") from None
    return key, value, add


def _child(node: Any, part: str) -> tuple[bool, Any]:
    if isinstance(node, Mapping):
        return (part in node, node.get(part))
    if (
        isinstance(node, list)
        and part.lstrip("-").isdigit()
        and -len(node) <= int(part) < len(node)
    ):
        return True, node[int(part)]
    return False, None


def get(cfg: Mapping[str, Any], key: str, default: Any = ConfigError) -> Any:
    """Read a dotted key; without a default a missing key is a :class:`ConfigError`."""
    node: Any = cfg
    for part in key.split("."):
        found, node = _child(node, part)
        if not found:
            if default is ConfigError:
                raise ConfigError(f"config has no key '{key}'{did_you_mean(key, flat_keys(cfg))}")
            return default
    return node


def set_key(cfg: dict[str, Any], key: str, value: Any, add: bool = False) -> None:
    """Set a dotted key in place. Missing keys are an error unless ``add`` is true or the key
    is documented (:func:`moekit.sections.documented`)."""
    add = add or documented(key)
    parts = key.split(".")
    node: Any = cfg
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        found, child = _child(node, part)
        if not found:
            if not add:
                raise ConfigError(
                    f"override '{key}': no such key{did_you_mean(key, flat_keys(cfg))} "
                    f"(use +{key}=... to add a new key)"
                )
            if not isinstance(node, dict):
                parent = ".".join(parts[:depth]) or "<root>"
                raise ConfigError(f"override '{key}': '{parent}' is not a mapping")
            child = value if last else {}
            node[part] = child
        if last:
            if isinstance(node, list):
                node[int(part)] = value
            else:
                node[part] = value
            return
        if not isinstance(child, dict | list):
            prefix = ".".join(parts[: depth + 1])
            raise ConfigError(f"override '{key}': '{prefix}' is a value, not a mapping")
        node = child


def apply_overrides(cfg: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``cfg`` with every ``[+]key=value`` override applied in order."""
    result = copy.deepcopy(dict(cfg))
    for text in overrides:
        key, value, add = parse_override(text)
        set_key(result, key, value, add=add)
    return result


def dump(cfg: Mapping[str, Any]) -> str:
    """The config as YAML text, keys in their given order."""
    return yaml.dump(dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def dump_value(value: Any) -> str:
    """One value as flow-style YAML for an override: ``key=<dump_value(v)>`` reads back ``v``."""
    text = yaml.dump(value, Dumper=_Dumper, default_flow_style=True, width=10**6).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def save(cfg: Mapping[str, Any], path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically: a temporary file, then a rename)."""
    return atomic_write_text(path, dump(cfg))
