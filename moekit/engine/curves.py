"""Training curves from ``metrics.csv``, drawn to be read.

The IDRiD paper's Figure 3 is the model: one metric of one task over the epochs, training and
validation. Each figure holds a handful of lines:

- one figure per task and metric (``seg/dice`` -> ``seg_dice.png``) and per loss, with the
  metric's summary values: the main value and ``per_image`` where the metric has one, each in
  one colour, training solid and validation dashed;
- per-class values (``seg/dice/MA``...) in ``<task>_<metric>_per_class.png``: a grid of small
  panels, one class each, on one shared y-range (per-image per-class values stay in the CSV);
- the learning rates of the parameter groups, the task weights, the routing losses and the
  multi-task Δ each in one figure, one colour per series (a grid when there are more than
  :data:`MAX_SERIES`).

Epoch ticks are integers. The y-range comes from the data but spans at least a tenth of the
unit interval for scores in ``[0, 1]`` (a tenth of the largest magnitude otherwise), so noise
in the third decimal does not look like a cliff.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

SKIP = ("epoch", "split", "time")
FAMILIES = ("lr", "aux", "mtl_delta", "task_weights")
"""Figure keys whose columns are parallel series (one colour each), not a metric's values."""
MAX_SERIES = 6
SPLIT_STYLE = {"train": "-", "val": "--"}
DPI = 90


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (every moekit figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def y_label(key: str) -> str:
    """The y-axis label of a figure: ``loss`` -> ``loss``, ``seg/dice`` -> ``dice``,
    ``lr`` -> ``learning rate``."""
    names = {
        "lr": "learning rate",
        "aux": "routing loss",
        "task_weights": "task weight",
        "mtl_delta": "multi-task Δ (%)",
    }
    return names.get(key, key.split("/")[-1])


def figure_key(column: str) -> str:
    """The figure a column is drawn in (``seg/dice/MA`` -> ``seg/dice``, ``lr/x`` -> ``lr``)."""
    parts = column.split("/")
    if parts[0] in ("lr", "aux", "mtl_delta"):
        return parts[0]
    if len(parts) == 2 and parts[1] == "weight":
        return "task_weights"
    return "/".join(parts[:2])


_SPELLED = {"Δ": "delta_", "θ": "theta", "%": "pct", "=": "_"}


def figure_name(key: str) -> str:
    """A file name for a figure key: ``seg/dice`` -> ``seg_dice.png``, ``Δt (%)`` ->
    ``delta_t_pct.png`` (symbols a column label uses are spelled out)."""
    spelled = "".join(_SPELLED.get(char, char) for char in key)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", spelled).strip("_") + ".png"


def y_limits(values: np.ndarray, unit_interval: bool) -> tuple[float, float] | None:
    """The y-range of ``values``: their extent plus a 5% margin, widened to a minimum span
    around their middle (0.1 for scores in ``[0, 1]``, kept inside ``[0, 1]``; else a tenth of
    the largest magnitude); ``None`` without a finite value."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None
    low, high = float(finite.min()), float(finite.max())
    minimum = 0.1 if unit_interval else 0.1 * max(abs(low), abs(high)) or 1.0
    if high - low < minimum:
        middle = (low + high) / 2
        low, high = middle - minimum / 2, middle + minimum / 2
        if unit_interval:
            shift = max(0.0, -low) - max(0.0, high - 1.0)
            low, high = low + shift, high + shift
    margin = 0.05 * (high - low)
    return low - margin, high + margin


def _is_unit_interval(key: str, frame: pd.DataFrame, columns: list[str]) -> bool:
    """A score in ``[0, 1]`` (accuracy, Dice...): a task metric, not a loss or a family."""
    if key in FAMILIES or key.split("/")[-1] in ("loss", "objective") or key == "objective":
        return False
    values = frame[columns].to_numpy(dtype=float)
    finite = values[np.isfinite(values)]
    return finite.size > 0 and bool(((finite >= 0) & (finite <= 1)).all())


def _split_groups(frame: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    return [(str(split), rows) for split, rows in frame.groupby("split", sort=False)]


def _splits_with_data(frame: pd.DataFrame, columns: list[str]) -> list[str]:
    return [split for split, rows in _split_groups(frame) if rows[columns].notna().any().any()]


def _draw(
    ax: Any, frame: pd.DataFrame, column: str, colour: Any, name: str, show_split: bool = True
) -> bool:
    """Training solid, validation dashed (other splits dotted), all in ``colour``; the legend
    label is ``name (split)`` (only ``name`` when every series has one split)."""
    drawn = False
    for split, rows in _split_groups(frame):
        data = rows[["epoch", column]].dropna()
        if data.empty:
            continue
        label = (f"{name} ({split})" if show_split else name) if name else split
        style = SPLIT_STYLE.get(split, ":")
        ax.plot(data["epoch"], data[column], style, color=colour, marker="o", ms=3, label=label)
        drawn = True
    return drawn


def _epoch_axis(ax: Any, frame: pd.DataFrame) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    epochs = frame["epoch"].dropna()
    if len(epochs) and epochs.min() == epochs.max():
        ax.set_xlim(epochs.min() - 0.5, epochs.max() + 0.5)
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)


TITLES = {
    "lr": "learning rate per parameter group",
    "aux": "routing losses (as minimised, unweighted)",
    "task_weights": "task weights",
    "mtl_delta": "multi-task Δ against the baselines",
}


def _series_label(key: str, column: str) -> str:
    """The legend name of ``column`` in ``key``'s figure (empty for the metric itself)."""
    if column == key:
        return ""
    if key == "task_weights":
        return column.split("/")[0]
    rest = column[len(key) + 1 :] if column.startswith(f"{key}/") else column
    return rest.replace("_", " ")


def _lines_figure(
    frame: pd.DataFrame, key: str, columns: list[str], unit_interval: bool, path: Path
) -> Path | None:
    plt = pyplot()
    colours = plt.get_cmap("tab10").colors
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    drawn = False
    show_split = len(_splits_with_data(frame, columns)) > 1
    for i, column in enumerate(columns):
        name = _series_label(key, column) or (y_label(key) if len(columns) > 1 else "")
        drawn |= _draw(ax, frame, column, colours[i % 10], name, show_split)
    if not drawn:
        plt.close(fig)
        return None
    limits = y_limits(frame[columns].to_numpy(dtype=float), unit_interval)
    if limits is not None:
        ax.set_ylim(*limits)
    _epoch_axis(ax, frame)
    ax.set_ylabel(y_label(key))
    ax.set_title(TITLES.get(key, key))
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return _save(fig, path)


def _grid_figure(
    frame: pd.DataFrame, key: str, columns: list[str], unit_interval: bool, path: Path, title: str
) -> Path | None:
    plt = pyplot()
    cols = min(4, len(columns))
    rows = math.ceil(len(columns) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(2.6 * cols + 0.4, 2.0 * rows + 0.9), squeeze=False, sharey=True
    )
    limits = y_limits(frame[columns].to_numpy(dtype=float), unit_interval)
    drawn = False
    for i, (ax, column) in enumerate(zip(axes.flat, columns, strict=False)):
        drawn |= _draw(ax, frame, column, "tab:blue", "")
        ax.set_title(_series_label(key, column) or column, fontsize=9)
        _epoch_axis(ax, frame)
        if i + cols < len(columns):  # a panel below carries the epoch label
            ax.set_xlabel("")
        if limits is not None:
            ax.set_ylim(*limits)
    for ax in list(axes.flat)[len(columns) :]:
        ax.axis("off")
    if not drawn:
        plt.close(fig)
        return None
    for ax in axes[:, 0]:
        ax.set_ylabel(y_label(key))
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", fontsize="small", frameon=False, ncols=2)
    fig.suptitle(title, fontsize=11, x=0.02, ha="left")
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    pyplot().close(fig)
    return path


def _is_per_class(key: str, column: str) -> bool:
    """``seg/dice/MA`` (a class) but not ``seg/dice`` or ``seg/dice/per_image``."""
    return column != key and column != f"{key}/per_image" and key not in FAMILIES


def plot_curves(metrics_csv: str | Path, out_dir: str | Path) -> list[Path]:
    """Draw the numeric columns of ``metrics_csv`` against the epoch; returns the files."""
    frame = pd.read_csv(metrics_csv)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[str]] = {}
    for column in frame.columns:
        if column not in SKIP and pd.api.types.is_numeric_dtype(frame[column]):
            groups.setdefault(figure_key(column), []).append(column)
    written = []
    for key, columns in groups.items():
        classes = [c for c in columns if _is_per_class(key, c) and "/per_image/" not in c]
        summary = [c for c in columns if not _is_per_class(key, c)]
        unit = _is_unit_interval(key, frame, columns)
        path = out_dir / figure_name(key)
        if len(summary) > MAX_SERIES:
            figure = _grid_figure(frame, key, summary, unit, path, TITLES.get(key, key))
        elif summary:
            figure = _lines_figure(frame, key, summary, unit, path)
        else:
            figure = None
        if figure is not None:
            written.append(figure)
        if classes:
            per_class = out_dir / figure_name(f"{key}_per_class")
            title = f"{key} per class"
            figure = _grid_figure(frame, key, classes, unit, per_class, title)
            if figure is not None:
                written.append(figure)
    return written
