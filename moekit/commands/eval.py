"""``moekit eval RUN_DIR [--split test] [--checkpoint best|last] [--baselines SOURCE ...]
[--drop-modality NAME ...]``."""

from __future__ import annotations

import argparse
from collections.abc import Mapping


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a trained run on a split",
        description="Compute the losses and metrics of a run's checkpoint on a split; writes "
        "RUN_DIR/eval/<split>-<checkpoint>.json and prints the values. With --baselines, also "
        "the multi-task delta of each task's primary (first) metric against them.",
    )
    parser.add_argument("run_dir", help="a run directory written by moekit train")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--checkpoint", default="best", choices=("best", "last"))
    parser.add_argument(
        "--baselines",
        nargs="+",
        metavar="SOURCE",
        help="single-task baselines: run directories (evaluated on the same split and "
        "checkpoint), eval JSON files of moekit eval, or YAML files {task/metric: value}; "
        "replaces the run's eval.mtl_delta",
    )
    parser.add_argument(
        "--drop-modality",
        nargs="+",
        default=[],
        metavar="NAME",
        help="evaluate with these modalities removed from every sample (absent, as a missing "
        "file), and print each metric's drop against the evaluation with all modalities "
        "(modality competition); writes eval/<split>-<checkpoint>-without-<NAME>.json",
    )
    parser.add_argument(
        "--variant",
        default="pooled",
        choices=("pooled", "task_mean"),
        help="how the deltas are averaged (docs/metrics.md; default: pooled)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moekit.engine import checkpoint, evaluate_run
    from moekit.engine.eval_run import primary_metrics, read_baselines
    from moekit.engine.rundir import run_lock
    from moekit.types import tasks_from_config

    delta = None
    if args.baselines:
        cfg = checkpoint.read_config(checkpoint.checkpoint_dir(args.run_dir, args.checkpoint))
        keys = primary_metrics(tasks_from_config(cfg))
        baselines = read_baselines(args.baselines, keys, args.split, args.checkpoint)
        delta = {"baselines": baselines, "variant": args.variant}
    dropped = args.drop_modality
    with run_lock(args.run_dir, "moekit eval"):  # writes RUN_DIR/eval
        values = evaluate_run(
            args.run_dir, args.split, args.checkpoint, mtl_delta=delta, drop_modalities=dropped
        )
        full = evaluate_run(args.run_dir, args.split, args.checkpoint) if dropped else None
    width = max(len(k) for k in values)
    for key, value in values.items():
        print(f"{key:<{width}}  {value:.6g}")
    report = delta_report(values, args.split)
    if report:
        print(report)
    if full is not None:
        print(drop_report(full, values, args.split, dropped))
    return 0


def drop_report(
    full: Mapping[str, float], without: Mapping[str, float], split: str, dropped: list[str]
) -> str:
    """Each task metric with all modalities, without ``dropped``, and the drop (all −
    without; a loss's drop is negative when it grows)."""
    prefix = f"{split}/"
    keys = [
        k for k in full if k.startswith(prefix) and k.count("/") == 2 and not k.endswith("/loss")
    ]
    width = max([len(k) - len(prefix) for k in keys] + [6])
    lines = [
        f"\nwithout {', '.join(dropped)} ({split}):",
        f"  {'metric':<{width}}  {'all':>8}  {'without':>8}  {'drop':>8}",
    ]
    for key in keys:
        a, b = full[key], without.get(key, float("nan"))
        lines.append(f"  {key[len(prefix) :]:<{width}}  {a:8.4f}  {b:8.4f}  {a - b:+8.4f}")
    return "\n".join(lines)


def delta_report(values: Mapping[str, float], split: str) -> str:
    """The multi-task delta lines of ``values`` (empty when there are none)."""
    prefix = f"{split}/mtl_delta/"
    deltas = {k[len(prefix) :]: v for k, v in values.items() if k.startswith(prefix)}
    if not deltas:
        return ""
    variant = next(k for k in deltas if "/" not in k)
    width = max(len(k) for k in deltas)
    lines = [f"\nmulti-task delta Δt vs baselines ({split}, % , positive = better):"]
    for key, value in deltas.items():
        if key != variant:
            lines.append(f"  {key:<{width}}  {value:+.2f}  ({values[f'{split}/{key}']:.4g})")
    lines.append(f"  {'mean (' + variant + ')':<{width}}  {deltas[variant]:+.2f}")
    return "\n".join(lines)
