"""``moekit results RUN_DIR [--split test] [--checkpoint best]``: the run's results table.

Evaluates the checkpoint on the split, writes ``results.csv`` / ``results.md`` (the IDRiD seed's
Table-1 shape), counts expert usage (``usage/``: the mean number of experts each task's gates
select, which top-p varies), draws prediction overlays of a few images
(``figures/predictions_<split>.png``, the seed's Figures 4/5) and prints the table.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "results", help="evaluate a run and write its results table (Table-1 shape)"
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory")
    parser.add_argument("--split", default="test", help="split to evaluate (default: test)")
    parser.add_argument("--checkpoint", default="best", choices=["best", "last"])


def report(run_dir: str | Path, split: str = "test", checkpoint: str = "best") -> str:
    """Evaluate, count expert usage, draw prediction overlays, write the results files; return
    the printed report."""
    from moekit.analysis.predictions import plot_predictions
    from moekit.analysis.results import result_row, write_results
    from moekit.analysis.runs import split_loader
    from moekit.analysis.usage import collect_usage
    from moekit.engine import evaluate_run, load_model

    run_dir = Path(run_dir)
    metrics = evaluate_run(run_dir, split, checkpoint)
    model, cfg, tasks = load_model(run_dir, checkpoint)
    loader = split_loader(cfg, split)
    usage = collect_usage(model, loader, list(tasks), info={"split": split})
    usage.save(run_dir / "usage")
    plot_predictions(model, loader.dataset, tasks, run_dir / "figures" / f"predictions_{split}.png")
    selected = usage.selected_frame()
    label = f"{cfg.get('name', run_dir.name)} ({split}, {checkpoint})"
    notes = [
        "Accuracy in %; IoU/Dice on the foreground, dataset-level (per-image means in "
        "results.csv).",
        "Mean experts selected per sample (final routing):\n\n"
        + selected[["layer", "mean_selected"]].to_markdown(index=False, floatfmt=".2f"),
    ]
    table = write_results(run_dir, [result_row(label, metrics, tasks, split)], tasks, notes)
    return "\n\n".join([table.to_markdown(index=False), *notes[1:]])


def run(args: argparse.Namespace) -> int:
    print(report(args.run_dir, args.split, args.checkpoint))
    return 0
