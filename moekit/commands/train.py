"""``moekit train CONFIG [--set k=v ...] [--run-dir DIR] [--resume RUN_DIR]``."""

from __future__ import annotations

import argparse

from moekit.commands.config import add_override_argument


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train an experiment from a config",
        description="Train the experiment of CONFIG into a run directory (docs/training.md). "
        "Runs unchanged under torchrun or accelerate launch.",
    )
    parser.add_argument(
        "config", nargs="?", help="a YAML config (default with --resume: the run's)"
    )
    add_override_argument(parser)
    parser.add_argument("--run-dir", help="run directory (default: runs/<name>-<timestamp>)")
    parser.add_argument(
        "--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moekit import config
    from moekit.engine import Trainer
    from moekit.errors import ConfigError

    if args.config is None and args.resume is None:
        raise ConfigError("moekit train: give a CONFIG file, or --resume RUN_DIR")
    if args.resume is not None and args.run_dir is not None:
        raise ConfigError("moekit train: --resume continues in RUN_DIR; drop --run-dir")
    source = args.config if args.config is not None else Path(args.resume) / "config.yaml"
    cfg = config.load(source, args.overrides)
    trainer = Trainer(cfg, run_dir=args.run_dir, resume=args.resume)
    summary = trainer.fit()
    best = summary["best"]
    if trainer.accelerator.is_main_process:
        print(
            f"{summary['status']}: {summary['run_dir']} (best {summary['monitor']} "
            f"{best['value']} at epoch {best['epoch']})"
        )
    return 0
