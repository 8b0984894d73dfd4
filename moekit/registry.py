"""Named registries and ``build(cfg)``: the one door from a config dict to an object.

Every interchangeable part of moekit (routers, experts, MoE layers, backbones, heads, models,
losses, weightings, datasets, metrics, transforms) is registered by name with a decorator and
built from a config dict ``{"type": name, **kwargs}``, in the spirit of timm's
``create_model`` and mmcv's registries. Mistakes fail early with messages that name the
registry, the bad name or argument and the valid choices.

Example::

    @ROUTERS.register("top_p")
    class TopPRouter(nn.Module): ...

    router = ROUTERS.build({"type": "top_p", "p": 0.4}, dim=384, num_experts=16)
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from importlib.metadata import entry_points
from typing import Any, TypeVar

from moekit.errors import ConfigError, RegistryError, did_you_mean

T = TypeVar("T", bound=Callable[..., Any])

# Subpackages whose import registers the built-in entries. Imported on a registry's first
# lookup (not by moekit/__init__), so that `import moekit.registry` stays cheap.
BUILTIN_MODULES = (
    "moekit.routing",
    "moekit.moe",
    "moekit.nn",
    "moekit.losses",
    "moekit.metrics",
    "moekit.models",
    "moekit.data",
    "moekit.engine",
    "moekit.projects",
)
PLUGIN_GROUP = "moekit.plugins"
"""Entry-point group of installed plugins: each entry names a module whose import registers
its components (``[project.entry-points."moekit.plugins"] mine = "my_package.moekit"``)."""
_loaded = {"builtins": False}


def _definition_site(obj: Any) -> str:
    module = getattr(obj, "__module__", "?")
    qualname = getattr(obj, "__qualname__", repr(obj))
    try:
        line = inspect.getsourcelines(obj)[1]
    except (OSError, TypeError):
        return f"{module}.{qualname}"
    return f"{module}.{qualname} (line {line})"


def _parameters(fn: Callable[..., Any]) -> list[inspect.Parameter]:
    target = fn.__init__ if inspect.isclass(fn) else fn
    params = list(inspect.signature(target).parameters.values())
    if inspect.isclass(fn) and params and params[0].name == "self":
        params = params[1:]
    return params


def accepted_kwargs(fn: Callable[..., Any]) -> tuple[list[str], bool]:
    """Names of the keyword arguments ``fn`` accepts, and whether it takes ``**kwargs``."""
    params = _parameters(fn)
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    return names, var_kw


def required_kwargs(fn: Callable[..., Any]) -> list[str]:
    """Names of the keyword arguments ``fn`` needs (those without a default)."""
    return [
        p.name
        for p in _parameters(fn)
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty
    ]


class Registry:
    """A mapping from names to classes or factory functions of one kind."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._entries: dict[str, Callable[..., Any]] = {}

    def __repr__(self) -> str:
        return f"Registry({self.name}, {sorted(self._entries)})"

    def __contains__(self, name: object) -> bool:
        import_builtins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        import_builtins()
        return len(self._entries)

    def names(self) -> list[str]:
        import_builtins()
        return sorted(self._entries)

    def items(self) -> list[tuple[str, Callable[..., Any]]]:
        import_builtins()
        return sorted(self._entries.items())

    def register(self, name: str | T | None = None) -> Any:
        """Register a class or function, as ``@REG.register`` or ``@REG.register("name")``.

        Without a name the object's ``__name__`` is used. Registering a second object under a
        name already taken is an error naming both definitions.
        """
        if callable(name):
            return self._add(name.__name__, name)

        def decorator(obj: T) -> T:
            return self._add(name or obj.__name__, obj)

        return decorator

    def _add(self, name: str, obj: T) -> T:
        existing = self._entries.get(name)
        if existing is not None and existing is not obj:
            raise RegistryError(
                f"{self.name}: '{name}' is registered twice: by {_definition_site(existing)} "
                f"and by {_definition_site(obj)}"
            )
        self._entries[name] = obj
        return obj

    def get(self, name: str) -> Callable[..., Any]:
        """Return the entry called ``name``; unknown names list the valid ones."""
        if not isinstance(name, str):
            raise RegistryError(f"{self.name}: 'type' must be a string, got {name!r}")
        if name not in self._entries:
            import_builtins()
        try:
            return self._entries[name]
        except KeyError:
            valid = ", ".join(self.names()) or "(none registered)"
            raise RegistryError(
                f"{self.name}: unknown type '{name}'; valid: {valid}"
                f"{did_you_mean(name, self._entries)}"
            ) from None

    def check(self, cfg: Mapping[str, Any] | str, where: str, provided: Iterable[str] = ()) -> None:
        """Check a component config without building it: its ``type`` is registered and every
        argument is one the entry accepts. ``provided`` names arguments the owner passes (and
        keys the owner consumes); missing arguments are left to :meth:`build`."""
        if isinstance(cfg, str):
            cfg = {"type": cfg}
        try:
            fn = self.get(cfg.get("type"))
        except RegistryError as exc:
            raise ConfigError(f"config key '{where}.type': {exc}") from None
        accepted, var_kw = accepted_kwargs(fn)
        if var_kw:
            return
        for key in cfg:
            if key != "type" and key not in accepted and key not in provided:
                raise ConfigError(
                    f"config key '{where}.{key}': {self.name} '{cfg['type']}' does not accept "
                    f"'{key}'{did_you_mean(str(key), accepted)}; accepted: "
                    f"{', '.join(accepted) or '(none)'}"
                )

    def build(self, cfg: Mapping[str, Any] | str, /, **defaults: Any) -> Any:
        """Build one object from ``{"type": name, **kwargs}`` (or just a name).

        ``defaults`` fill arguments the config leaves out (the config wins). Every argument
        is checked against the constructor's signature before it is called, so a typo in a
        key is reported with the accepted keys instead of a ``TypeError`` deep inside.
        """
        if isinstance(cfg, str):
            cfg = {"type": cfg}
        if not isinstance(cfg, Mapping):
            raise RegistryError(
                f"{self.name}: expected a mapping with a 'type' key, got {type(cfg).__name__}"
            )
        if "type" not in cfg:
            raise RegistryError(
                f"{self.name}: config {dict(cfg)!r} has no 'type' key; "
                f"valid types: {', '.join(self.names())}"
            )
        kwargs = {**defaults, **{k: v for k, v in cfg.items() if k != "type"}}
        name = cfg["type"]
        fn = self.get(name)
        accepted, var_kw = accepted_kwargs(fn)
        if not var_kw:
            unknown = [k for k in kwargs if k not in accepted]
            if unknown:
                key = unknown[0]
                source = "" if key in cfg else " (passed by the caller, not the config)"
                raise RegistryError(
                    f"{self.name} '{name}' does not accept '{key}'{source}"
                    f"{did_you_mean(key, accepted)}; accepted: {', '.join(accepted) or '(none)'}"
                )
        missing = [k for k in required_kwargs(fn) if k not in kwargs]
        if missing:
            raise RegistryError(
                f"{self.name} '{name}' needs {', '.join(repr(k) for k in missing)}; "
                f"accepted: {', '.join(accepted)}"
            )
        return fn(**kwargs)


def summary_line(obj: Any) -> str:
    """First paragraph of an entry's docstring on one line (for ``moekit list``)."""
    doc = (inspect.getdoc(obj) or "").strip()
    return " ".join(doc.split("\n\n")[0].split())


def import_builtins() -> None:
    """Import every built-in module and installed plugin so that the registries are filled
    (once; every registry lookup calls it, so registries are populated on first use)."""
    if _loaded["builtins"]:
        return
    _loaded["builtins"] = True
    try:
        for module in BUILTIN_MODULES:
            importlib.import_module(module)
        for entry in entry_points(group=PLUGIN_GROUP):
            where = f"plugin '{entry.name}' (entry point group {PLUGIN_GROUP})"
            import_module(entry.value, where)
    except BaseException:
        _loaded["builtins"] = False
        raise


def import_module(name: str, where: str) -> None:
    """Import a user's module (its import registers components); a module that is not
    importable is a one-line :class:`ConfigError` naming ``where``."""
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and name.startswith(exc.name):
            raise ConfigError(f"{where}: no module named '{name}' (is it on PYTHONPATH?)") from None
        raise


def import_user_modules(cfg: Mapping[str, Any]) -> None:
    """Import the built-ins, the plugins and the config's ``imports:`` (a list of module names,
    like mmengine's ``custom_imports``), before anything of the config is built."""
    import_builtins()
    modules = cfg.get("imports") or []
    if isinstance(modules, str) or not isinstance(modules, list):
        raise ConfigError(f"config key 'imports': expected a list of module names, got {modules!r}")
    for i, module in enumerate(modules):
        if not isinstance(module, str):
            raise ConfigError(f"config key 'imports[{i}]': expected a module name, got {module!r}")
        import_module(module, f"config key 'imports[{i}]'")


ROUTERS = Registry("ROUTERS")
EXPERTS = Registry("EXPERTS")
MOE_LAYERS = Registry("MOE_LAYERS")
BACKBONES = Registry("BACKBONES")
HEADS = Registry("HEADS")
MODELS = Registry("MODELS")
TASK_LOSSES = Registry("TASK_LOSSES")
AUX_LOSSES = Registry("AUX_LOSSES")
WEIGHTINGS = Registry("WEIGHTINGS")
DATASETS = Registry("DATASETS")
METRICS = Registry("METRICS")
TRANSFORMS = Registry("TRANSFORMS")
PREPROCESS = Registry("PREPROCESS")
OPTIMIZERS = Registry("OPTIMIZERS")
LR_SCHEDULERS = Registry("LR_SCHEDULERS")
SAMPLERS = Registry("SAMPLERS")

REGISTRIES: dict[str, Registry] = {
    r.name: r
    for r in (
        ROUTERS,
        EXPERTS,
        MOE_LAYERS,
        BACKBONES,
        HEADS,
        MODELS,
        TASK_LOSSES,
        AUX_LOSSES,
        WEIGHTINGS,
        DATASETS,
        METRICS,
        TRANSFORMS,
        PREPROCESS,
        OPTIMIZERS,
        LR_SCHEDULERS,
        SAMPLERS,
    )
}
