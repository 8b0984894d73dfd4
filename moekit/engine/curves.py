"""Training curves from ``metrics.csv``: one PNG per loss and metric, one line per split.

The IDRiD seed's Figure 3 is the model: accuracy and Dice of each task over the epochs for
training and validation. Columns that belong together share a figure: a metric with its
per-class and per-image values (``seg/dice``, ``seg/dice/MA``, ``seg/dice/per_image``), the
learning rates of all parameter groups, the task weights, the routing losses.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd

SKIP = ("epoch", "split", "time")


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
        "mtl_delta": "multi-task Δ",
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


def plot_curves(metrics_csv: str | Path, out_dir: str | Path) -> list[Path]:
    """Draw the numeric columns of ``metrics_csv`` against the epoch; returns the files."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()

    frame = pd.read_csv(metrics_csv)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[str]] = {}
    for column in frame.columns:
        if column not in SKIP and pd.api.types.is_numeric_dtype(frame[column]):
            groups.setdefault(figure_key(column), []).append(column)
    written = []
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key, columns in groups.items():
        ax.clear()
        drawn = False
        for split, rows in frame.groupby("split", sort=False):
            for column in columns:
                data = rows[["epoch", column]].dropna()
                if data.empty:
                    continue
                label = str(split) if len(columns) == 1 else f"{split} {column}"
                style = "-" if column == key else "--"
                ax.plot(data["epoch"], data[column], style, marker="o", markersize=3, label=label)
                drawn = True
        if not drawn:
            continue
        ax.set_xlabel("epoch")
        ax.set_ylabel(y_label(key))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = out_dir / figure_name(key)
        fig.savefig(path, dpi=80)
        written.append(path)
    plt.close(fig)
    return written
