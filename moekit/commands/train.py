"""``moekit train CONFIG [--set k=v ...] [--run-dir DIR] [--resume RUN_DIR | --init RUN_DIR]``."""

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
    parser.add_argument(
        "--init",
        metavar="RUN_DIR",
        help="start from the weights of another run (sets finetune.init; the config's "
        "finetune.mode, e.g. routers, decides what is trained; docs/modsquad.md)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moekit import config
    from moekit.engine import Trainer, finetune
    from moekit.errors import ConfigError

    if args.config is None and args.resume is None:
        raise ConfigError("moekit train: give a CONFIG file, or --resume RUN_DIR")
    if args.resume is not None and args.run_dir is not None:
        raise ConfigError("moekit train: --resume continues in RUN_DIR; drop --run-dir")
    if args.init is not None and (args.resume is not None or args.config is None):
        raise ConfigError("moekit train: --init starts a new run from CONFIG; drop --resume")
    source = args.config if args.config is not None else Path(args.resume) / "config.yaml"
    cfg = config.load(source, args.overrides)
    if args.init is not None:
        cfg = finetune.with_init(cfg, args.init)
    trainer = Trainer(cfg, run_dir=args.run_dir, resume=args.resume)
    summary = trainer.fit()
    best = summary["best"]
    if trainer.accelerator.is_main_process:
        print(f"best {summary['monitor']} {best['value']} at epoch {best['epoch']}")
    return 0
