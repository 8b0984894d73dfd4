"""``moekit eval RUN_DIR [--split test] [--checkpoint best|last]``."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a trained run on a split",
        description="Compute the losses and metrics of a run's checkpoint on a split; writes "
        "RUN_DIR/eval/<split>-<checkpoint>.json and prints the values.",
    )
    parser.add_argument("run_dir", help="a run directory written by moekit train")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--checkpoint", default="best", choices=("best", "last"))
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moekit.engine import evaluate_run

    values = evaluate_run(args.run_dir, args.split, args.checkpoint)
    width = max(len(k) for k in values)
    for key, value in values.items():
        print(f"{key:<{width}}  {value:.6g}")
    return 0
