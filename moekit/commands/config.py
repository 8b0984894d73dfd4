"""``moekit config show FILE [--set k=v ...]``: print the resolved config."""

from __future__ import annotations

import argparse


def add_override_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--set a.b=c [d=e ...]`` option shared by every command that reads a config."""
    parser.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys (values parsed as YAML; +key=value adds a new key)",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("config", help="inspect configs")
    actions = parser.add_subparsers(dest="action", required=True)
    show = actions.add_parser(
        "show", help="print the resolved config (bases merged, overrides set)"
    )
    show.add_argument("file", help="a YAML config file")
    add_override_argument(show)
    show.set_defaults(func=run_show)
    check = actions.add_parser("check", help="check every 'type:' against its registry")
    check.add_argument("file", help="a YAML config file")
    add_override_argument(check)
    check.set_defaults(func=run_check)


def run_show(args: argparse.Namespace) -> int:
    from moekit import config

    print(config.dump(config.load(args.file, args.overrides)), end="")
    return 0


def run_check(args: argparse.Namespace) -> int:
    from moekit import config
    from moekit.config_check import check_types

    check_types(config.load(args.file, args.overrides), source=args.file)
    print(f"{args.file}: ok")
    return 0
