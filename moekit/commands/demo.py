"""``moekit demo``: the flagship IDRiD experiment on its synthetic replica, end to end.

Writes the replica (if it is not there), trains ``configs/idrid/demo.yaml``, evaluates the best
checkpoint on the test split and prints the results table (``moekit results``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moekit.commands.config import add_override_argument

DEMO_CONFIG = "configs/idrid/demo.yaml"
DEMO_DATA = "data/idrid-replica"
REPLICA = {"n_grading_train": 160, "n_grading_test": 40, "n_seg_train": 40, "n_seg_test": 20}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="run the flagship IDRiD experiment on its synthetic replica"
    )
    parser.add_argument("--config", default=DEMO_CONFIG, help=f"default: {DEMO_CONFIG}")
    parser.add_argument("--data", default=DEMO_DATA, help=f"replica folder (default: {DEMO_DATA})")
    parser.add_argument("--run-dir", help="run directory (default: runs/<name>-<timestamp>)")
    add_override_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moekit import config
    from moekit.commands.results import report
    from moekit.data.replicas.idrid import make_idrid_replica
    from moekit.engine import Trainer

    data = Path(args.data)
    if not (data / "B. Disease Grading").is_dir():
        make_idrid_replica(data, seed=0, **REPLICA)
        print(f"wrote the synthetic IDRiD replica to {data}")
    roots = [f"data.{split}.root={data}" for split in ("train", "val", "test")]
    cfg = config.load(args.config, [*roots, *args.overrides])
    trainer = Trainer(cfg, run_dir=args.run_dir)
    summary = trainer.fit()
    print(report(summary["run_dir"], "test", "best"))
    print(f"\nrun directory: {summary['run_dir']} (curves in figures/, table in results.md)")
    return 0
