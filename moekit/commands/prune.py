"""``moekit prune RUN_DIR --task T (--threshold θ | --keep-top H | --sweep) [--reduce-k]``."""

from __future__ import annotations

import argparse


def _fractions(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prune",
        help="extract one task as a standalone model with fewer experts",
        description="Per-task expert extraction (Mod-Squad §3.5): count expert usage on the "
        "profiling split, keep the experts task T uses (usage frequency count/tokens >= θ, or "
        "the top H of each MoE layer), save a standalone single-task model (moekit eval and "
        "load_model accept it) "
        "and print parameters, FLOPs, the metric and the largest output difference before and "
        "after. θ = 0 removes only never-selected experts and reproduces the outputs.",
    )
    parser.add_argument("run_dir", help="a run directory written by moekit train")
    parser.add_argument("--task", required=True, help="the task to extract")
    rule = parser.add_mutually_exclusive_group(required=True)
    rule.add_argument(
        "--threshold",
        type=float,
        metavar="θ",
        help="keep experts selected by at least a fraction θ of the task's tokens "
        "(usage frequency count/tokens; 0.01 = 1%%)",
    )
    rule.add_argument(
        "--keep-top",
        type=float,
        metavar="H",
        help="keep the most used fraction H of each layer's experts (0.4 = 40%%)",
    )
    rule.add_argument(
        "--sweep",
        action="store_true",
        help="run every --thresholds and --keep-tops value and draw the curve",
    )
    parser.add_argument(
        "--thresholds",
        type=_fractions,
        default=None,
        metavar="θ,θ,...",
        help="usage frequencies θ of --sweep (default: the paper's 0,0.001,0.05,0.2,0.5,0.9)",
    )
    parser.add_argument(
        "--keep-tops",
        type=_fractions,
        default=None,
        metavar="H,H,...",
        help="keep-top fractions of --sweep (default: 0.3,0.4,0.6,0.8,1)",
    )
    parser.add_argument(
        "--reduce-k",
        action="store_true",
        help="lower a top-k router's k to the experts its layer keeps (every rule selects "
        "among the kept experts only)",
    )
    parser.add_argument("--split", default="test", help="split of the metric (default: test)")
    parser.add_argument(
        "--profile-split",
        default="val",
        help="split to count usage and compare outputs on (default: val)",
    )
    parser.add_argument("--checkpoint", default="best", choices=("best", "last"))
    parser.add_argument("--usage", help="a usage.safetensors (or its folder) instead of counting")
    parser.add_argument("--out", help="output folder (default: RUN_DIR/pruned/<task>-<rule>)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out if it exists (never the source run or a folder holding it)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moekit.analysis.extraction import check_rule
    from moekit.engine.rundir import run_lock

    if not args.sweep:
        check_rule(args.threshold, args.keep_top)  # fail before the model is loaded
    with run_lock(args.run_dir, "moekit prune"):  # the default --out lies in the run
        return _extract(args)


def _extract(args: argparse.Namespace) -> int:
    import json

    from moekit.analysis.extraction_report import (
        PAPER_KEEP_TOPS,
        PAPER_THRESHOLDS,
        TaskExtraction,
        format_report,
    )
    from moekit.engine.rundir import json_safe

    extraction = TaskExtraction(
        args.run_dir, args.task, args.split, args.profile_split, args.checkpoint, args.usage
    )
    if args.sweep:
        frame, figure = extraction.sweep(
            PAPER_THRESHOLDS if args.thresholds is None else args.thresholds,
            PAPER_KEEP_TOPS if args.keep_tops is None else args.keep_tops,
            args.reduce_k,
            args.out,
            args.overwrite,
        )
        if args.json:
            rows = json_safe(frame.to_dict("records"))
            print(json.dumps({"rows": rows, "figure": str(figure)}))
            return 0
        columns = ["rule", "params_after", "flops_after", "metric_after", "max_abs_diff"]
        print(frame[columns].to_string(index=False))
        print(f"curve: {figure}")
        return 0
    report = extraction.extract(
        args.threshold, args.keep_top, args.reduce_k, args.out, args.overwrite
    )
    print(json.dumps(json_safe(report)) if args.json else format_report(report))
    return 0
