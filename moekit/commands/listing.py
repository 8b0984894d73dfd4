"""``moekit list [REGISTRY]``: the registered names with the first line of each docstring."""

from __future__ import annotations

import argparse

from moekit.errors import ConfigError, did_you_mean


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("list", help="list registered routers, models, losses, ...")
    parser.add_argument("registry", nargs="?", help="one registry, e.g. ROUTERS or routers")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moekit.registry import REGISTRIES, import_builtins, summary_line

    import_builtins()
    selected = list(REGISTRIES.values())
    if args.registry:
        name = args.registry.upper()
        if name not in REGISTRIES:
            raise ConfigError(
                f"unknown registry '{args.registry}'; valid: {', '.join(REGISTRIES)}"
                f"{did_you_mean(name, REGISTRIES)}"
            )
        selected = [REGISTRIES[name]]
    for registry in selected:
        print(f"{registry.name} ({len(registry)})")
        width = max((len(n) for n in registry.names()), default=0)
        for entry_name, entry in registry.items():
            print(f"  {entry_name:<{width}}  {summary_line(entry)}".rstrip())
    return 0
