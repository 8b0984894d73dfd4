"""``moekit config show FILE [--set k=v ...]``: print the resolved config."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


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
    check = actions.add_parser(
        "check",
        help="check a config as train does at start-up",
        description="Check every key, every component's name and arguments, the tasks and the "
        "schedules, then build the experiment (model, losses, optimizer, datasets) as "
        "'moekit train' does, without writing anything: 'ok' means the run will start.",
    )
    check.add_argument("file", help="a YAML config file")
    check.add_argument(
        "--no-data", action="store_true", help="skip building the datasets (no data on disk)"
    )
    add_override_argument(check)
    check.set_defaults(func=run_check)


def run_show(args: argparse.Namespace) -> int:
    from moekit import config

    print(config.dump(config.load(args.file, args.overrides)), end="")
    return 0


def run_check(args: argparse.Namespace) -> int:
    from moekit import config
    from moekit.engine.config_check import check_config
    from moekit.engine.experiment import build_experiment
    from moekit.engine.optim import build_optimizer, build_scheduler, named_parameters
    from moekit.errors import ConfigError
    from moekit.sections import settings

    cfg = config.load(args.file, args.overrides)
    check_config(cfg, source=args.file)
    try:
        exp = build_experiment(cfg, splits=() if args.no_data else None)
        if exp.optimizer is None:  # no training data built: the optimizer and schedule still are
            params = named_parameters(exp.model, exp.objective.weighting)
            build_scheduler(build_optimizer(params, cfg), cfg, 1, settings(cfg, "train")["epochs"])
    except ConfigError as exc:
        raise ConfigError(f"{args.file}: {exc}") from None
    print(f"{args.file}: ok")
    return 0
