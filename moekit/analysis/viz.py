"""``moekit viz RUN_DIR``: every figure of a trained run, in ``RUN_DIR/figures/``.

- ``usage_<layer>.png``: expert selection frequency per task and expert (Mod-Squad Fig. 5);
- ``task_relation.png``: experts two tasks share on the same input (Fig. 6), for models whose
  MoE layers route several tasks;
- ``experts_selected.png``: histogram of experts selected per token, per layer;
- training curves (:func:`moekit.engine.curves.plot_curves`), unless the trainer drew them;
- ``predictions.png``: image, ground truth and prediction for a few images of the split.

The usage counted for the figures is saved in ``RUN_DIR/usage/``.
"""

from __future__ import annotations

from pathlib import Path

from moekit.analysis.figures import (
    plot_selected_histograms,
    plot_task_relation,
    plot_usage_heatmaps,
)
from moekit.analysis.predictions import plot_predictions
from moekit.analysis.runs import TrainedRun, progress
from moekit.analysis.usage import collect_usage
from moekit.engine.curves import figure_name, plot_curves
from moekit.errors import DataError
from moekit.moe import moe_layers
from moekit.sections import settings


def draw_run_figures(
    run_dir: str | Path, split: str = "val", checkpoint: str = "best", num_images: int = 4
) -> tuple[list[Path], list[str]]:
    """Draw the run's figures; returns the files written and notes on figures skipped."""
    run = TrainedRun.load(run_dir, checkpoint)
    figures = run.path / "figures"
    written: list[Path] = []
    notes: list[str] = []
    loader = run.loader(split)
    if moe_layers(run.model):
        usage = collect_usage(
            run.model,
            loader,
            list(run.tasks),
            progress=progress(f"usage {split}"),
            info={"split": split, "checkpoint": checkpoint},
        )
        usage.save(run.path / "usage")
        written += plot_usage_heatmaps(usage, figures)
        try:
            relation = usage.task_relation()
            written.append(plot_task_relation(relation, usage.tasks, figures / "task_relation.png"))
        except DataError as exc:
            notes.append(f"task_relation.png skipped: {exc}")
        written.append(plot_selected_histograms(usage, figures / "experts_selected.png"))
    else:
        notes.append("expert figures skipped: the model has no MoE layer")
    metrics = run.path / "metrics.csv"
    if not metrics.is_file():
        notes.append("training curves skipped: no metrics.csv")
    elif not (figures / figure_name("loss")).is_file():
        written += plot_curves(metrics, figures)
    written.append(
        plot_predictions(
            run.model,
            loader.dataset,
            run.tasks,
            figures / "predictions.png",
            num_images,
            threshold=settings(run.cfg, "eval")["threshold"],
        )
    )
    return written, notes
