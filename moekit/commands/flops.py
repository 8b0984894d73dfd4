"""``moekit flops CONFIG|RUN_DIR [--input-size [C] H W] [--batch N] [--per-task] [--json]``."""

from __future__ import annotations

import argparse

from moekit.commands.config import add_override_argument, positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "flops",
        help="count parameters and FLOPs (experts that ran only)",
        description="Parameters (total and active per token) and FLOPs of a model, counted "
        "by fvcore with handles for attention and grouped matmul, for the experts the routing "
        "actually selects. FLOPs are multiply-adds (fvcore's convention). A RUN_DIR uses its "
        "trained weights; a CONFIG a fresh model. Input: --input-size random images, else the "
        "first --batch samples of --split.",
    )
    parser.add_argument("source", help="a config file or a run directory")
    parser.add_argument(
        "--input-size",
        type=positive_int,
        nargs="+",
        metavar="N",
        help="[C] H W of random input images (default: dataset samples)",
    )
    parser.add_argument(
        "--batch", type=positive_int, default=1, help="images per forward (default: 1)"
    )
    parser.add_argument("--split", default="val", help="dataset split for inputs (default: val)")
    parser.add_argument("--checkpoint", default="best", choices=("best", "last"))
    parser.add_argument(
        "--per-task",
        action="store_true",
        help="also count each task alone: the shared layers and experts, and only that task's "
        "head and gate rows",
    )
    parser.add_argument(
        "--depth",
        type=int,
        default=2,
        help="module nesting shown in the table (default: 2; MoE layers always)",
    )
    parser.add_argument(
        "--check", action="store_true", help="cross-check matmul FLOPs with torch's FlopCounterMode"
    )
    parser.add_argument(
        "--csv", help="write the per-module table here (default for a run: RUN_DIR/flops.csv)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_override_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import pandas as pd

    from moekit.analysis.flops import flops_report, reference_macs
    from moekit.analysis.runs import TrainedRun, example_inputs, untrained_model
    from moekit.fileio import atomic_write_text
    from moekit.types import Batch

    source = Path(args.source)
    if source.is_dir():
        trained = TrainedRun.load(source, args.checkpoint)
        model, cfg, tasks = trained.model, trained.cfg, trained.tasks
        csv = args.csv or source / "flops.csv"
    else:
        model, cfg, tasks = untrained_model(source, args.overrides)
        csv = args.csv
    inputs = example_inputs(cfg, args.split, args.batch, args.input_size)
    report = flops_report(model, inputs, list(tasks), args.per_task, args.depth)
    tensors = inputs.inputs if isinstance(inputs, Batch) else inputs
    report["input_shape"] = (
        list(tensors.shape)
        if hasattr(tensors, "shape")
        else {k: list(v.shape) for k, v in tensors.items()}
    )
    if isinstance(inputs, Batch) and inputs.present is not None:
        report["present"] = inputs.present.tolist()
    if args.check:
        report["reference_matmul_flops"] = reference_macs(model, inputs)
    table = pd.DataFrame(
        [{"module": name or "(total)", **values} for name, values in report["per_module"].items()]
    )
    if csv:
        atomic_write_text(csv, table.to_csv(index=False))
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"input {report['input_shape']}; FLOPs are {report['unit']}")
    print(f"parameters {report['params']:,}  active per token {report['active_params']:,}")
    print(f"FLOPs {report['flops']:,} ({report['flops_per_sample']:,} per sample)")
    if args.check:
        print(
            f"matmul/conv/attention FLOPs: fvcore {report['matmul_flops']:,}, "
            f"FlopCounterMode {report['reference_matmul_flops']:,}"
        )
    print(
        table.to_string(index=False, formatters={"flops": "{:,}".format, "params": "{:,}".format})
    )
    if report["per_task"]:
        per_task = pd.DataFrame([{"task": t, **v} for t, v in report["per_task"].items()])
        counted = sorted(set(per_task.pop("counted")))
        numbers = {c: "{:,}".format for c in per_task if c != "task"}
        print(f"each task alone (counted: {'; '.join(counted)}):")
        print(per_task.to_string(index=False, formatters=numbers))
    if report["unknown_ops"]:
        print(f"not counted (unknown custom ops): {report['unknown_ops']}")
    if csv:
        print(f"saved: {csv}")
    return 0
