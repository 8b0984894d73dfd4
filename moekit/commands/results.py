"""``moekit results RUN_DIR [RUN_DIR ...] [--split test] [--checkpoint best] [--out DIR]
[--reference]``: one results table over several runs (rows: models).

Evaluates each run's checkpoint on the split and writes ``results.csv`` / ``results.md`` (the
IDRiD paper's Table-1 shape: one row per run, e.g. the single-task ResNet-50, the single-task
DeepLabV3+ and the multi-task MoE) into ``--out`` (default: the first run directory). Adds a
row with the majority-class rate of the split's grading tasks (the accuracy of always
predicting the most frequent class) and, with ``--reference``, the IDRiD paper's reported
Table 1 as rows labelled "reported by the IDRiD paper, real IDRiD". For every run it also
counts expert usage (``usage/`` in the run: the mean number of experts each task's gate
selects, which top-p varies) and draws prediction overlays of a few images
(``figures/predictions_<split>.png``, the paper's Figures 4/5), thresholded at the run's
``eval.threshold``.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "results", help="evaluate runs and write one results table (Table-1 shape)"
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (rows)")
    parser.add_argument("--split", default="test", help="split to evaluate (default: test)")
    parser.add_argument("--checkpoint", default="best", choices=["best", "last"])
    parser.add_argument(
        "--out", help="folder for results.md / results.csv (default: the first run directory)"
    )
    parser.add_argument(
        "--reference",
        action="store_true",
        help="add the IDRiD paper's reported Table 1 (real IDRiD) as labelled reference rows",
    )


def routing_note(model: Any) -> str:
    """The routing rules of the model's MoE layers, e.g. ``top_p (p=0.8, score=sigmoid)``."""
    from moekit.moe import moe_layers

    rules = []
    for _, layer in moe_layers(model):
        cfg = dict(layer.router_config)
        name = str(cfg.pop("type", type(layer.router).__name__))
        text = name + (f" ({', '.join(f'{k}={v}' for k, v in sorted(cfg.items()))})" if cfg else "")
        if text not in rules:
            rules.append(text)
    return "; ".join(rules) or "no MoE layer"


def grading_labels(dataset: Any, tasks: Iterable[str]) -> dict[str, list[int]]:
    """Class labels of the labelled samples of ``dataset`` per task: from
    ``dataset.class_labels(task)`` where the dataset offers it (no image is decoded), else by
    reading every sample."""
    tasks = list(tasks)
    if not tasks:
        return {}
    getter = getattr(dataset, "class_labels", None)
    if callable(getter):
        return {t: list(getter(t)) for t in tasks}
    labels: dict[str, list[int]] = {t: [] for t in tasks}
    for i in range(len(dataset)):
        sample = dataset[i]
        for t in tasks:
            if bool(sample["has_target"][t]):
                labels[t].append(int(sample["targets"][t]))
    return labels


def report(
    run_dirs: str | Path | Sequence[str | Path],
    split: str = "test",
    checkpoint: str = "best",
    out_dir: str | Path | None = None,
    sources: Sequence[str] | None = None,
    reference: bool = False,
) -> str:
    """Evaluate every run, count its expert usage, draw its prediction overlays and write one
    results table (a row per run) into ``out_dir`` (default: the first run); return the
    printed report. ``sources`` labels the runs' rows (default: the run folder's name)."""
    import pandas as pd

    from moekit.analysis.predictions import plot_predictions
    from moekit.analysis.runs import split_loader
    from moekit.analysis.usage import collect_usage
    from moekit.engine import evaluate_run, load_model
    from moekit.errors import ConfigError
    from moekit.moe import moe_layers
    from moekit.projects.idrid.table import (
        majority_row,
        markdown,
        reference_rows,
        result_row,
        write_results,
    )
    from moekit.sections import settings

    runs = [Path(run_dirs)] if isinstance(run_dirs, str | Path) else [Path(r) for r in run_dirs]
    if not runs:
        raise ConfigError("results: give at least one run directory")
    if sources is not None and len(sources) != len(runs):
        raise ConfigError(f"results: {len(sources)} source labels for {len(runs)} runs")
    rows: list[dict[str, Any]] = []
    all_tasks: dict[str, Any] = {}
    labels: dict[str, list[int]] = {}
    selected: dict[str, pd.Series] = {}
    routing: list[str] = []
    for i, run_dir in enumerate(runs):
        metrics = evaluate_run(run_dir, split, checkpoint)
        model, cfg, tasks = load_model(run_dir, checkpoint)
        loader = split_loader(cfg, split)
        usage = collect_usage(model, loader, list(tasks), info={"split": split})
        usage.save(run_dir / "usage")
        figure = run_dir / "figures" / f"predictions_{split}.png"
        plot_predictions(
            model, loader.dataset, tasks, figure, threshold=settings(cfg, "eval")["threshold"]
        )
        name = str(cfg.get("name", run_dir.name))
        source = sources[i] if sources is not None else f"run {run_dir.name}"
        source = f"{source} ({split}, {checkpoint} checkpoint)"
        rows.append(result_row(name, metrics, tasks, split, source))
        for task_name, task in tasks.items():
            all_tasks.setdefault(task_name, task)
        new = [t for t, task in tasks.items() if task.kind == "multiclass" and t not in labels]
        labels.update(grading_labels(loader.dataset, new))
        frame = usage.selected_frame()
        if len(frame):
            experts = sorted({layer.num_experts for _, layer in moe_layers(model)})
            column = f"{name} (of {'/'.join(map(str, experts))})"
            if column in selected:
                column = f"{name} [{run_dir.name}] (of {'/'.join(map(str, experts))})"
            selected[column] = frame.set_index("layer")["mean_selected"]
            routing.append(f"{name}: {routing_note(model)}")
    table_rows = list(rows)
    if labels:
        table_rows.append(majority_row(labels, split, f"{split}-split label counts"))
    if reference:
        table_rows += reference_rows()
    notes = [
        "Accuracy in %; IoU/Dice on the foreground, dataset-level (per-image means in "
        "results.csv); `-`: the model has no such task. The majority-class row is the accuracy "
        "of always predicting the split's most frequent class.",
    ]
    if reference:
        notes.append(
            "Rows 'reported by the IDRiD paper, real IDRiD' are its Table 1 (Roy 2025: "
            "ResNet-50 backbones from ImageNet weights, the paper's image sizes, 100 epochs, "
            "the real IDRiD test split), copied for reference, not measured here."
        )
    if selected:
        layers = list(
            dict.fromkeys(layer for column in selected.values() for layer in column.index)
        )
        usage_table = pd.DataFrame(selected).reindex(layers)
        usage_table = pd.DataFrame(
            {c: ["-" if pd.isna(v) else f"{v:.2f}" for v in usage_table[c]] for c in usage_table},
            index=usage_table.index,
        )
        usage_table = usage_table.rename_axis("layer").reset_index()
        notes.append(
            "Mean experts selected per image, every head on every image of the split (the "
            "checkpoint's routing: "
            + "; ".join(dict.fromkeys(routing))
            + "):\n\n"
            + markdown(usage_table)
        )
    out = Path(out_dir) if out_dir is not None else runs[0]
    table = write_results(out, table_rows, all_tasks, notes)
    return "\n\n".join([markdown(table), *notes])


def run(args: argparse.Namespace) -> int:
    from moekit.engine.rundir import run_lock

    target = args.out if args.out is not None else args.run_dirs[0]
    with run_lock(target, "moekit results") if Path(target).is_dir() else nullcontext():
        print(
            report(
                args.run_dirs,
                args.split,
                args.checkpoint,
                out_dir=args.out,
                reference=args.reference,
            )
        )
    return 0
