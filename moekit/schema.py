"""One mechanism for every config section: its keys, their defaults and their checks.

A :class:`Section` lists its keys as :class:`Field` s (a default, a check, one line of
documentation) or nested sections. :meth:`Section.parse` fills in the defaults, runs the checks
and rejects any key the section does not list, with the same one-line message everywhere::

    config key 'train.epoch' is not known; did you mean 'epochs'?; valid: epochs, grad_accum, ...
    config key 'train.epochs': expected an integer >= 1, got 0

A check is a function ``(value, key) -> value`` that returns the value (normalised where the
section says so) or raises :class:`~moekit.errors.ConfigError` naming ``key``. The checks here
are the vocabulary every section uses; component sections (``model``, ``optimizer``...) only
check their shape (a name or ``{type: ...}``): their arguments are checked against the
registry entry's signature by :mod:`moekit.engine.config_check`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from moekit.errors import ConfigError, did_you_mean

Check = Callable[[Any, str], Any]


def fail(key: str, expected: str, value: Any) -> NoReturn:
    """Raise the one-line error of a wrong value."""
    raise ConfigError(f"config key '{key}': expected {expected}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _bounds(minimum: float | None, maximum: float | None, below: bool) -> str:
    parts = []
    if minimum is not None:
        parts.append(f">= {minimum}")
    if maximum is not None:
        parts.append(f"{'<' if below else '<='} {maximum}")
    return " and ".join(parts)


def integer(minimum: int | None = None, maximum: int | None = None) -> Check:
    """An int (not a bool) in ``[minimum, maximum]``."""
    expected = " ".join(["an integer", _bounds(minimum, maximum, False)]).strip()

    def check(value: Any, key: str) -> int:
        if not _is_int(value):
            fail(key, expected, value)
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            fail(key, expected, value)
        return value

    return check


def number(
    minimum: float | None = None, maximum: float | None = None, below_maximum: bool = False
) -> Check:
    """An int or float in ``[minimum, maximum]`` (``maximum`` excluded with ``below_maximum``),
    returned as a float."""
    expected = " ".join(["a number", _bounds(minimum, maximum, below_maximum)]).strip()

    def check(value: Any, key: str) -> float:
        if not _is_number(value):
            fail(key, expected, value)
        too_high = maximum is not None and (value >= maximum if below_maximum else value > maximum)
        if (minimum is not None and value < minimum) or too_high:
            fail(key, expected, value)
        return float(value)

    return check


def boolean(value: Any, key: str) -> bool:
    """``true`` or ``false``."""
    if not isinstance(value, bool):
        fail(key, "true or false", value)
    return value


def string(value: Any, key: str) -> str:
    """A string."""
    if not isinstance(value, str):
        fail(key, "a string", value)
    return value


def anything(value: Any, key: str) -> Any:
    """Any value (checked where it is used)."""
    return value


def mapping(value: Any, key: str) -> dict[str, Any]:
    """A mapping (``null`` reads as an empty one)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        fail(key, "a mapping", value)
    return dict(value)


def choice(*options: Any) -> Check:
    """One of ``options``."""
    names = ", ".join(str(o) for o in options)

    def check(value: Any, key: str) -> Any:
        if not any(value == o and type(value) is type(o) for o in options):
            hint = did_you_mean(str(value), [str(o) for o in options])
            raise ConfigError(f"config key '{key}': '{value}' is not one of {names}{hint}")
        return value

    return check


def optional(check: Check) -> Check:
    """``null`` or a value that passes ``check``."""

    def optional_check(value: Any, key: str) -> Any:
        return None if value is None else check(value, key)

    return optional_check


def list_of(check: Check, scalar: bool = False) -> Check:
    """A list whose every item passes ``check`` (a single item reads as a list of one with
    ``scalar``)."""

    def check_list(value: Any, key: str) -> list[Any]:
        if value is None:
            return []
        if scalar and not isinstance(value, list):
            value = [value]
        if not isinstance(value, list):
            fail(key, "a list", value)
        return [check(item, f"{key}[{i}]") for i, item in enumerate(value)]

    return check_list


OBJECT_KEY = "python_object"
"""The key of what a config records for a component given as a built Python object (through
``Trainer(model=...)``): ``{python_object: "pkg.module.Class", saved: ...}``. Such an entry
cannot be rebuilt from the config; the object must be passed again."""


def object_entry(obj: Any, saved: str) -> dict[str, str]:
    """The config entry of a built object: its class and how it was saved."""
    cls = type(obj)
    return {OBJECT_KEY: f"{cls.__module__}.{cls.__qualname__}", "saved": saved}


def is_object_entry(value: Any) -> bool:
    """Whether a config value records a built Python object (:func:`object_entry`)."""
    return isinstance(value, Mapping) and OBJECT_KEY in value


def component(value: Any, key: str) -> dict[str, Any] | None:
    """A component: a registered name or a mapping with ``type`` (``null``: none), returned
    as a mapping. Its arguments are checked against the registry's entry by
    :mod:`moekit.engine.config_check`."""
    if value is None:
        return None
    if isinstance(value, str):
        return {"type": value}
    if is_object_entry(value):
        return dict(value)
    if not isinstance(value, Mapping) or not isinstance(value.get("type"), str):
        fail(key, "a name or a mapping with 'type'", value)
    return dict(value)


def component_of(default_type: str) -> Check:
    """A component whose ``type`` defaults to ``default_type`` (a mapping may leave it out)."""

    def check(value: Any, key: str) -> dict[str, Any]:
        if isinstance(value, Mapping) and "type" not in value:
            value = {"type": default_type, **value}
        return component({"type": default_type} if value is None else value, key)

    return check


@dataclass(frozen=True)
class Field:
    """One key of a section: its default, its check and what it means."""

    default: Any = None
    check: Check = anything
    doc: str = ""
    required: bool = False


@dataclass(frozen=True)
class Section:
    """A config section: its keys (fields or nested sections), in documentation order.

    ``name`` is the dotted key of the section (``""`` for the top level); ``doc`` says what
    the section is for.
    """

    name: str
    fields: Mapping[str, Field | Section] = field(default_factory=dict)
    doc: str = ""

    def key(self, name: str) -> str:
        return f"{self.name}.{name}" if self.name else name

    def check_keys(self, given: Iterable[str]) -> None:
        """Reject the first key the section does not list."""
        for name in given:
            if name not in self.fields:
                valid = list(self.fields)
                raise ConfigError(
                    f"config key '{self.key(str(name))}' is not known"
                    f"{did_you_mean(str(name), valid)}; valid: {', '.join(valid)}"
                )

    def parse(self, raw: Any) -> dict[str, Any]:
        """``raw`` (a mapping or ``null``) with every default filled in and every value
        checked; unknown keys and missing required keys are a :class:`ConfigError`."""
        given = mapping(raw, self.name or "<top level>")
        self.check_keys(given)
        result: dict[str, Any] = {}
        for name, spec in self.fields.items():
            if isinstance(spec, Section):
                result[name] = spec.parse(given.get(name))
            elif name in given:
                result[name] = spec.check(given[name], self.key(name))
            elif spec.required:
                raise ConfigError(f"config key '{self.key(name)}' is required: {spec.doc}")
            else:
                result[name] = copy.deepcopy(spec.default)
        return result

    def defaults(self) -> dict[str, Any]:
        """Every key with its default (required keys left out)."""
        out: dict[str, Any] = {}
        for name, spec in self.fields.items():
            if isinstance(spec, Section):
                out[name] = spec.defaults()
            elif not spec.required:
                out[name] = copy.deepcopy(spec.default)
        return out

    def find(self, dotted: Sequence[str]) -> Field | Section | None:
        """The field or section at a dotted path below this section, or None."""
        node: Field | Section = self
        for part in dotted:
            if not isinstance(node, Section) or part not in node.fields:
                return None
            node = node.fields[part]
        return node
