"""Results tables in the shape of the IDRiD seed's Table 1 (rows: models; columns: grading
accuracy, then IoU/Dice per lesion).

Accuracy is reported in percent as in the seed. IoU and Dice are foreground-only and
dataset-level (intersections and unions summed over the split, the seed's way); the per-image
means are kept in the CSV beside them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from moekit.fileio import atomic_write_text
from moekit.types import Task


def result_row(
    label: str, metrics: Mapping[str, float], tasks: Mapping[str, Task], split: str
) -> dict[str, float | str]:
    """The numeric columns of one model: ``<task> acc`` (%), ``<task> IoU``/``Dice`` and their
    per-image means, from ``{"<split>/<task>/<metric>": value}``."""

    def value(key: str) -> float:
        return float(metrics.get(f"{split}/{key}", float("nan")))

    row: dict[str, float | str] = {"model": label}
    for name, task in tasks.items():
        if task.kind in ("multiclass", "multilabel"):
            row[f"{name} acc"] = 100 * value(f"{name}/accuracy")
        elif task.kind == "segmentation":
            for metric, column in (("iou", "IoU"), ("dice", "Dice")):
                row[f"{name} {column}"] = value(f"{name}/{metric}")
                row[f"{name} {column} per image"] = value(f"{name}/{metric}/per_image")
    return row


def table1(rows: Sequence[Mapping[str, float | str]], tasks: Mapping[str, Task]) -> pd.DataFrame:
    """Format rows as the seed's Table 1: ``acc`` with one decimal, lesions as ``IoU/Dice``."""
    frame = pd.DataFrame(rows)
    out = pd.DataFrame({"model": frame["model"]})
    for name, task in tasks.items():
        if f"{name} acc" in frame:
            out[name] = frame[f"{name} acc"].map(lambda v: f"{v:.1f}")
        elif task.kind == "segmentation":
            out[name] = [
                f"{i:.2f}/{d:.2f}" for i, d in zip(frame[f"{name} IoU"], frame[f"{name} Dice"])
            ]
    return out


def write_results(
    out_dir: str | Path,
    rows: Sequence[Mapping[str, float | str]],
    tasks: Mapping[str, Task],
    notes: Sequence[str] = (),
) -> pd.DataFrame:
    """Write ``results.csv`` (every number) and ``results.md`` (Table-1 shape); return the
    formatted table."""
    out_dir = Path(out_dir)
    table = table1(rows, tasks)
    atomic_write_text(out_dir / "results.csv", pd.DataFrame(rows).to_csv(index=False))
    text = "\n\n".join([table.to_markdown(index=False), *notes]) + "\n"
    atomic_write_text(out_dir / "results.md", text)
    return table
