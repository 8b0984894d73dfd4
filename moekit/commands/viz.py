"""``moekit viz RUN_DIR [--split val] [--checkpoint best] [--images 4]``."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "viz",
        help="draw a run's figures into RUN_DIR/figures",
        description="Expert-task selection heatmaps per MoE layer (Mod-Squad Fig. 5), the "
        "task-relation matrix (Fig. 6), experts-selected histograms, training curves (unless "
        "drawn) and prediction overlays for a few images of --split.",
    )
    parser.add_argument("run_dir", help="a run directory written by moekit train")
    parser.add_argument("--split", default="val", help="split to draw from (default: val)")
    parser.add_argument("--checkpoint", default="best", choices=("best", "last"))
    parser.add_argument("--images", type=int, default=4, help="images in predictions.png")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moekit.analysis.viz import draw_run_figures
    from moekit.engine.rundir import run_lock

    with run_lock(args.run_dir, "moekit viz"):
        written, notes = draw_run_figures(args.run_dir, args.split, args.checkpoint, args.images)
    for path in written:
        print(path)
    for note in notes:
        print(f"note: {note}")
    return 0
