"""``moekit usage RUN_DIR [--split val] [--checkpoint best] [--out DIR]``."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "usage",
        help="count how often each expert serves each task",
        description="Run a trained model over a split (every sample runs every task) and count, "
        "per MoE layer, task and expert, the selections and the summed routing weight, the "
        "experts selected per token and the task relation. Writes usage.safetensors, "
        "usage.csv (layer, task, expert, count, weight, share, rate) and selected.csv "
        "to RUN_DIR/usage/ (or --out). On multi-modal data it also measures the modality "
        "utilisation of the layers over several modalities' tokens (the share of each "
        "task's routing mass from each modality): modality.csv, modality_information.csv "
        "(the measured I(M;E|T)) and modality_utilisation.png.",
    )
    parser.add_argument("run_dir", help="a run directory written by moekit train")
    parser.add_argument("--split", default="val", help="split to count on (default: val)")
    parser.add_argument("--checkpoint", default="best", choices=("best", "last"))
    parser.add_argument("--out", help="output folder (default: RUN_DIR/usage)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moekit.engine.rundir import run_lock

    with run_lock(args.run_dir, "moekit usage"):  # writes RUN_DIR/usage
        return _count(args)


def _count(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moekit.analysis.runs import TrainedRun, progress
    from moekit.analysis.usage import collect_usage
    from moekit.errors import ConfigError
    from moekit.moe import moe_layers

    trained = TrainedRun.load(args.run_dir, args.checkpoint)
    if not moe_layers(trained.model):
        raise ConfigError(f"{args.run_dir}: the model has no MoE layer; nothing to count")
    usage = collect_usage(
        trained.model,
        trained.loader(args.split),
        list(trained.tasks),
        progress=progress(f"usage {args.split}"),
        info={"split": args.split, "checkpoint": args.checkpoint},
    )
    out = Path(args.out) if args.out else trained.path / "usage"
    usage.save(out)
    print(usage.selected_frame().to_string(index=False, float_format="{:.3f}".format))
    print(f"saved: {out}/usage.safetensors, usage.csv, selected.csv")
    modality = usage.modality.to_frame() if usage.modality is not None else None
    if modality is not None and len(modality):
        from moekit.analysis.figures import plot_modality_utilisation

        figure = plot_modality_utilisation(modality, out / "modality_utilisation.png")
        shown = modality.drop(columns=["mass"])
        print("\nmodality utilisation (share of each task's routing mass per modality):")
        print(shown.to_string(index=False, float_format="{:.3f}".format))
        information = usage.modality.information_frame()
        print(information.to_string(index=False, float_format="{:.4f}".format))
        print(f"saved: {out}/modality.csv, modality_information.csv, {figure.name}")
    return 0
