"""``moekit export RUN --out DIR [--task T (--threshold θ | --keep-top H) [--reduce-k]]``."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a trained model as a self-contained artifact folder",
        description="Write a run's model to a folder that moekit predict and "
        "moekit.load_artifact(DIR) use without the run directory or its dataset: weights "
        "(safetensors), the resolved config, tasks, class names, thresholds, the input "
        "pipeline (preprocessing, normalisation) and model_card.md (training data, metrics, "
        "parameters, FLOPs, moekit version). With --task, the task's subnetwork extracted by "
        "expert usage (as moekit prune; θ = 0 gives the full model's outputs for the task). "
        "Reading the input pipeline needs the run's data where its config says.",
    )
    parser.add_argument("run_dir", help="a run directory written by moekit train")
    parser.add_argument("--out", required=True, help="the artifact folder to write")
    parser.add_argument("--checkpoint", default="best", choices=("best", "last"))
    parser.add_argument("--task", help="export this task's extracted subnetwork only")
    rule = parser.add_mutually_exclusive_group()
    rule.add_argument(
        "--threshold",
        type=float,
        metavar="θ",
        help="with --task: keep experts selected by at least a fraction θ of the task's tokens "
        "(default: θ = 0, the experts the task ever selected)",
    )
    rule.add_argument(
        "--keep-top",
        type=float,
        metavar="H",
        help="with --task: keep the most used fraction H of each layer's experts",
    )
    parser.add_argument(
        "--reduce-k",
        action="store_true",
        help="with --task: lower a top-k router's k to the experts its layer keeps",
    )
    parser.add_argument(
        "--profile-split",
        default="val",
        help="with --task: the split expert usage is counted on (default: val)",
    )
    parser.add_argument(
        "--split",
        default=None,
        help="the dataset the input pipeline is read from (default: test, else val, else train)",
    )
    parser.add_argument(
        "--format",
        dest="formats",
        action="append",
        default=[],
        choices=("export", "torchscript"),
        help="also write a program that runs without moekit (torch.export model.pt2, "
        "TorchScript model.torchscript.pt), checked against the model; refused for models "
        "whose forward depends on input values, as MoE dispatch does (docs/predict.md)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from moekit.inference.artifact import RECORD_FILE, export_run

    threshold = args.threshold
    if args.task is not None and threshold is None and args.keep_top is None:
        threshold = 0.0
    out = export_run(
        args.run_dir,
        args.out,
        args.checkpoint,
        args.task,
        threshold,
        args.keep_top,
        args.reduce_k,
        args.profile_split,
        args.formats,
        args.overwrite,
        args.split,
    )
    record = json.loads((out / RECORD_FILE).read_text())
    cost = record["cost"]
    print(f"exported: {out}")
    print(f"  tasks: {', '.join(record['tasks'])}")
    print(f"  parameters {cost['params']:,}, FLOPs per input {cost['flops']:,}")
    if record["extraction"]:
        extraction = record["extraction"]
        print(
            f"  extracted '{extraction['task']}' ({extraction['rule']}): max |output diff| "
            f"{extraction['max_abs_diff']:.3g} on {extraction['profile_split']}"
        )
    for fmt, file in record["programs"].items():
        print(f"  {fmt}: {out / file}")
    return 0
