"""Results tables in the shape of the IDRiD paper's Table 1 (rows: models; columns: grading
accuracy, then IoU/Dice per lesion).

Accuracy is reported in percent as in the paper. IoU and Dice are foreground-only and
dataset-level (intersections and unions summed over the split, the paper's way); the per-image
means are kept in the CSV beside them. A model without a task shows ``-`` in its column, as in
the paper's table. Every row carries a ``source`` (what produced the numbers: a run of this
machine, a constant predictor, the IDRiD paper), so reported and measured numbers are never
mixed without a label.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pandas as pd

from moekit.fileio import atomic_write_text
from moekit.types import Task

Row = Mapping[str, float | str]

REFERENCE_SOURCE = "reported by the IDRiD paper, real IDRiD"


def _lesions(iou_dice: Mapping[str, tuple[float, float]]) -> dict[str, float]:
    return {
        f"{lesion} {column}": value
        for lesion, pair in iou_dice.items()
        for column, value in zip(("IoU", "Dice"), pair)
    }


PAPER_TABLE1: tuple[dict[str, float | str], ...] = (
    {"model": "ResNet-50 (single-task)", "rg acc": 54.3, "mer acc": 81.5},
    {
        "model": "DeepLabV3+ (single-task)",
        **_lesions(
            {
                "MA": (0.25, 0.41),
                "HE": (0.31, 0.47),
                "EX": (0.16, 0.27),
                "SE": (0.44, 0.61),
                "OD": (0.91, 0.95),
            }
        ),
    },
    {
        "model": "Multi-Task MoE",
        "rg acc": 55.3,
        "mer acc": 78.6,
        **_lesions(
            {
                "MA": (0.20, 0.34),
                "HE": (0.31, 0.48),
                "EX": (0.15, 0.26),
                "SE": (0.45, 0.62),
                "OD": (0.90, 0.95),
            }
        ),
    },
)
"""The IDRiD paper's Table 1 (Roy 2025; ResNet-50 backbones, 3 experts per task, IDRiD test
split)."""


def reference_rows() -> list[dict[str, float | str]]:
    """The IDRiD paper's reported Table-1 rows, labelled :data:`REFERENCE_SOURCE`."""
    return [{"model": row["model"], "source": REFERENCE_SOURCE, **row} for row in PAPER_TABLE1]


def result_row(
    label: str,
    metrics: Mapping[str, float],
    tasks: Mapping[str, Task],
    split: str,
    source: str | None = None,
) -> dict[str, float | str]:
    """The numeric columns of one model: ``<task> acc`` (%), ``<task> IoU``/``Dice`` and their
    per-image means, from ``{"<split>/<task>/<metric>": value}``."""

    def value(key: str) -> float:
        return float(metrics.get(f"{split}/{key}", float("nan")))

    row: dict[str, float | str] = {"model": label}
    if source is not None:
        row["source"] = source
    for name, task in tasks.items():
        if task.kind in ("multiclass", "multilabel"):
            row[f"{name} acc"] = 100 * value(f"{name}/accuracy")
        elif task.kind == "segmentation":
            for metric, column in (("iou", "IoU"), ("dice", "Dice")):
                row[f"{name} {column}"] = value(f"{name}/{metric}")
                row[f"{name} {column} per image"] = value(f"{name}/{metric}/per_image")
    return row


def majority_row(
    labels: Mapping[str, Iterable[int]], split: str, source: str | None = None
) -> dict[str, float | str]:
    """The accuracy (%) of always predicting each task's most frequent class of ``split``:
    the majority-class rate a classifier has to beat. ``labels``: ``{task: class labels of the
    split's labelled samples}``."""
    row: dict[str, float | str] = {"model": f"majority class ({split} split)"}
    if source is not None:
        row["source"] = source
    for name, values in labels.items():
        counts = Counter(int(v) for v in values)
        total = sum(counts.values())
        row[f"{name} acc"] = 100 * max(counts.values()) / total if total else math.nan
    return row


def _number(value: object, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{float(value):.{digits}f}"


def table1(rows: Sequence[Row], tasks: Mapping[str, Task]) -> pd.DataFrame:
    """Format rows as the IDRiD paper's Table 1: ``acc`` with one decimal, lesions as ``IoU/Dice``
    (two decimals), ``-`` where a model has no value; a ``source`` column when rows carry one.
    """
    frame = pd.DataFrame(rows)
    out = pd.DataFrame({"model": frame["model"]})
    if "source" in frame:
        out["source"] = frame["source"].fillna("")
    for name, task in tasks.items():
        if task.kind in ("multiclass", "multilabel"):
            column = frame.get(f"{name} acc", pd.Series([math.nan] * len(frame)))
            out[name] = [_number(v, 1) for v in column]
        elif task.kind == "segmentation":
            missing = pd.Series([math.nan] * len(frame))
            iou, dice = (frame.get(f"{name} {c}", missing) for c in ("IoU", "Dice"))
            out[name] = [
                "-" if _number(i, 2) == "-" else f"{_number(i, 2)}/{_number(d, 2)}"
                for i, d in zip(iou, dice)
            ]
    return out


def markdown(table: pd.DataFrame, floatfmt: str = ".2f") -> str:
    """``table`` as a Markdown table, cells exactly as formatted (tabulate would otherwise
    re-parse ``"45.0"`` as the number 45)."""
    return table.to_markdown(index=False, disable_numparse=True, floatfmt=floatfmt)


def write_results(
    out_dir: str | Path,
    rows: Sequence[Row],
    tasks: Mapping[str, Task],
    notes: Sequence[str] = (),
) -> pd.DataFrame:
    """Write ``results.csv`` (every number) and ``results.md`` (Table-1 shape) into
    ``out_dir``; return the formatted table."""
    out_dir = Path(out_dir)
    table = table1(rows, tasks)
    atomic_write_text(out_dir / "results.csv", pd.DataFrame(rows).to_csv(index=False))
    text = "\n\n".join([markdown(table), *notes]) + "\n"
    atomic_write_text(out_dir / "results.md", text)
    return table
