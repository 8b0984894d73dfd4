"""``moekit demo``: the flagship IDRiD experiment on its synthetic replica, end to end.

Loads and checks ``configs/idrid/demo.yaml`` (found beside the moekit checkout when the path is
not there relative to the current directory), writes the replica if its folder holds neither
part of it (a folder holding only one of ``A. Segmentation`` / ``B. Disease Grading`` is an
error, not silently used), trains, evaluates the best checkpoint on the test split and prints
the results table (``moekit results``) beside the IDRiD paper's reported Table 1, each row labelled
with where its numbers come from.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from moekit.commands.config import add_override_argument

DEMO_CONFIG = "configs/idrid/demo.yaml"
DEMO_DATA = "data/idrid-replica"
REPLICA = {"n_grading_train": 160, "n_grading_test": 40, "n_seg_train": 40, "n_seg_test": 20}
RUN_SOURCE = "this run, synthetic replica"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="run the flagship IDRiD experiment on its synthetic replica"
    )
    parser.add_argument(
        "--config",
        default=DEMO_CONFIG,
        help=f"default: {DEMO_CONFIG} (of the moekit checkout unless it exists here)",
    )
    parser.add_argument("--data", default=DEMO_DATA, help=f"replica folder (default: {DEMO_DATA})")
    parser.add_argument("--run-dir", help="run directory (default: runs/<name>-<timestamp>)")
    add_override_argument(parser)
    parser.set_defaults(func=run)


def replica_state(data: Path) -> str:
    """``"complete"`` when both top-level IDRiD folders are there, ``"absent"`` when neither is
    (the replica may be written), else a :class:`DataError` naming the missing folder."""
    from moekit.data.idrid import LAYOUT
    from moekit.errors import DataError

    parts = [LAYOUT.segmentation, LAYOUT.grading]
    present = [part for part in parts if (data / part).is_dir()]
    if len(present) == len(parts):
        return "complete"
    if not present:
        return "absent"
    missing = next(part for part in parts if part not in present)
    raise DataError(
        f"{data}: holds '{present[0]}' but not '{missing}': an incomplete IDRiD replica; "
        "remove the folder to have the demo write it again"
    )


def write_replica(data: Path) -> None:
    """Write the demo's replica into ``data`` through a temporary sibling folder, so an
    interrupted write leaves no partial replica behind."""
    from moekit.data.replicas.idrid import make_idrid_replica

    data.parent.mkdir(parents=True, exist_ok=True)
    staging = data.with_name(f".{data.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        make_idrid_replica(staging, seed=0, **REPLICA)
        if data.is_dir() and not any(data.iterdir()):
            data.rmdir()
        staging.rename(data)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_config(cfg: dict) -> None:
    """Fail on a config mistake before anything is written: every key and component
    (:func:`~moekit.engine.config_check.check_config`), and the model's arguments (the model
    is built once and dropped)."""
    from moekit.engine.config_check import check_config
    from moekit.errors import ConfigError
    from moekit.registry import MODELS
    from moekit.types import tasks_from_config

    check_config(cfg)
    if "model" not in cfg:
        raise ConfigError("config key 'model': the config defines no model")
    MODELS.build(cfg["model"], tasks=tasks_from_config(cfg))


def run(args: argparse.Namespace) -> int:
    from moekit import config
    from moekit.commands.results import report
    from moekit.engine import Trainer

    data = Path(args.data)
    roots = [f"data.{split}.root={data}" for split in ("train", "val", "test")]
    cfg = config.load(config.shipped_path(args.config), [*roots, *args.overrides])
    check_config(cfg)
    if replica_state(data) == "absent":
        write_replica(data)
        print(f"wrote the synthetic IDRiD replica to {data}")
    trainer = Trainer(cfg, run_dir=args.run_dir)
    summary = trainer.fit()
    print(report(summary["run_dir"], "test", "best", sources=[RUN_SOURCE], reference=True))
    print(
        f"\nrun directory: {summary['run_dir']} (results.md/csv; figures/: training curves and "
        "predictions_test.png; usage/: expert usage)"
    )
    return 0
