"""Figures of expert usage and extraction (PNG, matplotlib's Agg backend).

- :func:`plot_usage_heatmaps`: per MoE layer, the frequency with which each task selects each
  expert, tasks × experts (Mod-Squad, Chen et al., CVPR 2023, Fig. 5);
- :func:`plot_task_relation`: the mean share of experts two tasks use on the same input (Fig. 6);
- :func:`plot_selected_histograms`: experts selected per token, per layer (top-p varies it);
- :func:`plot_pruning_curve`: metric against parameters of extracted models (Fig. 3);
- :func:`plot_modality_utilisation`: per task, the share of a layer's routing mass drawn from
  each modality's tokens (:mod:`moekit.analysis.modality`; M4oE, Wu et al., ICLR 2025,
  Fig. 4b);
- :func:`plot_modality_drop`: how much each task's metric drops when a modality is removed at
  test time (modality competition, M4oE Fig. 4a).

Training curves are drawn by :func:`moekit.engine.curves.plot_curves`; prediction overlays by
:mod:`moekit.analysis.predictions`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch import Tensor

from moekit.analysis.usage import ExpertUsage
from moekit.engine.curves import figure_name, pyplot

DPI = 100
ANNOTATE_MAX_CELLS = 400


def _heatmap(
    ax: Any, values: np.ndarray, rows: list[str], cols: list[str], vmax: float, fmt: str
) -> Any:
    image = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows)
    if values.size <= ANNOTATE_MAX_CELLS:
        for (i, j), value in np.ndenumerate(values):
            if np.isfinite(value):
                colour = "black" if value > 0.6 * vmax else "white"
                ax.text(
                    j,
                    i,
                    format(value, fmt),
                    ha="center",
                    va="center",
                    color=colour,
                    fontsize=8 if values.size > 64 else 10,
                )
    return image


def save_figure(fig: Any, path: Path, *, tight: bool = False) -> Path:
    """Lay out, write (creating the folder) and close ``fig``; ``tight`` crops the saved
    image to its content (``bbox_inches="tight"``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight" if tight else None)
    pyplot().close(fig)
    return path


def plot_usage_heatmaps(usage: ExpertUsage, out_dir: str | Path) -> list[Path]:
    """``usage_<layer>.png`` per task-routed layer: ``rate[t, e]``, the fraction of task
    ``t``'s tokens that selected expert ``e``; layers that know no tasks (one gate each, e.g.
    per-task heads) share ``usage_single_gate_layers.png``, one row per layer."""
    plt = pyplot()
    out_dir = Path(out_dir)
    written = []
    single = {}
    for name, layer in usage.layers.items():
        rate = layer.rate.numpy()
        if rate.shape[0] == 1:
            single[name] = rate[0]
            continue
        fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * rate.shape[1] + 2), 0.45 * len(rate) + 1.8))
        image = _heatmap(
            ax, rate, usage.task_names_of(name), [str(e) for e in range(rate.shape[1])], 1.0, ".2f"
        )
        ax.set_xlabel("expert")
        ax.set_ylabel("task")
        ax.set_title(f"{name}: expert selection frequency")
        fig.colorbar(image, ax=ax, label="P(expert selected | task)")
        written.append(save_figure(fig, out_dir / figure_name(f"usage_{name}")))
    if single:
        width = max(len(v) for v in single.values())
        rate = np.full((len(single), width), np.nan)
        for i, values in enumerate(single.values()):
            rate[i, : len(values)] = values
        fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * width + 3), 0.45 * len(rate) + 1.8))
        image = _heatmap(ax, rate, list(single), [str(e) for e in range(width)], 1.0, ".2f")
        ax.set_xlabel("expert")
        ax.set_title("single-gate MoE layers: expert selection frequency")
        fig.colorbar(image, ax=ax, label="P(expert selected)")
        written.append(save_figure(fig, out_dir / "usage_single_gate_layers.png"))
    return written


def plot_task_relation(relation: Tensor, tasks: list[str], path: str | Path) -> Path:
    """The task-relation matrix (Mod-Squad Fig. 6) as an annotated heatmap."""
    plt = pyplot()
    size = 0.6 * len(tasks) + 2.5
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    image = _heatmap(ax, relation.numpy(), tasks, tasks, 1.0, ".2f")
    ax.tick_params(axis="x", labelrotation=45)
    ax.set_title("task relation: experts shared on the same input")
    fig.colorbar(image, ax=ax, label="mean share of experts shared")
    return save_figure(fig, Path(path))


def plot_selected_histograms(usage: ExpertUsage, path: str | Path) -> Path:
    """One bar chart per MoE layer: the fraction of tokens that selected ``k`` experts."""
    plt = pyplot()
    names = list(usage.layers)
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(max(3.2 * cols, 4.5), 2.6 * rows + 0.5), squeeze=False
    )
    for ax, name in zip(axes.flat, names, strict=False):
        layer = usage.layers[name]
        hist = layer.num_selected.numpy()
        ax.bar(range(len(hist)), hist / max(hist.sum(), 1.0), color="tab:blue")
        ax.set_xticks(range(0, len(hist), 1 if len(hist) <= 9 else 2))
        ax.set_title(f"{name}\nmean {layer.mean_selected():.2f}", fontsize=9)
        ax.set_xlabel("experts selected")
        ax.set_ylabel("fraction of tokens")
        ax.set_ylim(0, 1)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle("experts selected per token (or sample)", fontsize=10)
    return save_figure(fig, Path(path))


def better_direction(row: pd.Series) -> str | None:
    """``"higher"`` or ``"lower"``: which way the report's metric improves (its
    ``higher_is_better``; a loss without one is lower-is-better), ``None`` if unknown."""
    value = row.get("higher_is_better")
    if value is not None and not pd.isna(value):
        return "higher" if bool(value) else "lower"
    return "lower" if str(row.get("metric", "")).endswith("loss") else None


def _parameter_scale(count: float) -> tuple[float, str]:
    """Divide parameter counts by this and name the unit (``M`` above 10⁵, ``k`` above 10³)."""
    if count >= 1e5:
        return 1e6, "M"
    if count >= 1e3:
        return 1e3, "k"
    return 1.0, ""


def plot_pruning_curve(frame: pd.DataFrame, path: str | Path) -> Path:
    """Metric against parameters of extracted models (Mod-Squad Fig. 3): one line per rule
    (threshold θ, keep-top H), the full model as a star and a dashed line. The y axis and
    the title say whether higher or lower is better; the y-range spans at least a tenth of the
    unit interval for scores in ``[0, 1]`` (:func:`moekit.engine.curves.y_limits`), so a
    difference in the third decimal does not look like a cliff."""
    from moekit.engine.curves import y_limits

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    first = frame.iloc[0]
    scale, unit = _parameter_scale(float(frame[["params_before", "params_after"]].max().max()))
    for offset, (column, label, symbol) in enumerate(
        (("threshold", "threshold θ", "θ="), ("keep_top", "keep top H", "H="))
    ):
        rows = frame[frame[column].notna()].sort_values("params_after")
        if rows.empty:
            continue
        ax.plot(rows["params_after"] / scale, rows["metric_after"], marker="o", label=label)
        points = rows.groupby(["params_after", "metric_after"], sort=False)[column]
        for n, ((params, metric), values) in enumerate(points):  # one label per point
            text = symbol + ", ".join(f"{v * 100:g}%" for v in sorted(values))
            # θ labels above the points, H labels below, neighbours at alternating heights
            height = 6 + 10 * (n % 2)
            ax.annotate(
                text,
                (params / scale, metric),
                textcoords="offset points",
                xytext=(0, height if offset == 0 else -height - 8),
                ha="center",
                fontsize=8,
            )
    ax.axhline(first["metric_before"], color="grey", linestyle="--", linewidth=1)
    ax.plot(
        [first["params_before"] / scale],
        [first["metric_before"]],
        "*",
        color="black",
        markersize=11,
        label="full multi-task model",
    )
    values = np.concatenate([frame["metric_after"].to_numpy(float), [first["metric_before"]]])
    finite = values[np.isfinite(values)]
    unit_interval = finite.size > 0 and bool(((finite >= 0) & (finite <= 1)).all())
    limits = y_limits(values, unit_interval)
    if limits is not None:
        low, high = limits
        ax.set_ylim(low - 0.08 * (high - low), high + 0.08 * (high - low))  # room for labels
    better = better_direction(first)
    ax.set_xlabel(f"parameters of the extracted model{f' ({unit})' if unit else ''}")
    ax.set_ylabel(f"{first['metric']}{f' ({better} is better)' if better else ''}")
    ax.set_title(f"extracting task '{first['task']}'" + (f": {better} is better" if better else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")
    return save_figure(fig, Path(path))


def _panels(count: int, width: float, height: float, cols: int = 3) -> tuple[Any, list[Any]]:
    cols = min(cols, count)
    rows = math.ceil(count / cols)
    fig, axes = pyplot().subplots(
        rows, cols, figsize=(width * cols, height * rows + 0.6), squeeze=False
    )
    for ax in list(axes.flat)[count:]:
        ax.axis("off")
    return fig, list(axes.flat)[:count]


def plot_modality_utilisation(
    frame: pd.DataFrame, path: str | Path, panel: str = "layer", title: str | None = None
) -> Path:
    """Stacked bars per task: ``share`` of the routing mass from each modality (colours), one
    panel per value of ``panel``; a black tick marks each modality's token share (what a layer
    reading every token alike would give). ``frame`` has the columns of
    :meth:`moekit.analysis.modality.ModalityUsage.to_frame` (``share_std``, if present, is
    written beside each share)."""
    names = list(dict.fromkeys(frame[panel]))
    modalities = list(dict.fromkeys(frame["modality"]))
    colours = pyplot().get_cmap("tab10")
    fig, axes = _panels(len(names), 4.6, 0.55 * frame["task"].nunique() + 1.4)
    for ax, name in zip(axes, names, strict=True):
        part = frame[frame[panel] == name]
        tasks = list(dict.fromkeys(part["task"]))
        left, token_left = np.zeros(len(tasks)), np.zeros(len(tasks))
        for m, modality in enumerate(modalities):
            rows = part[part["modality"] == modality].set_index("task").reindex(tasks)
            share = rows["share"].to_numpy(dtype=float)
            ax.barh(tasks, share, left=left, color=colours(m), label=modality)
            for i, value in enumerate(share):
                text = f"{value:.2f}"
                if "share_std" in rows and np.isfinite(rows["share_std"].iloc[i]):
                    text += f"±{rows['share_std'].iloc[i]:.2f}"
                if value > 0.12:
                    ax.text(left[i] + value / 2, i, text, ha="center", va="center", fontsize=8)
            left += share
            token_left += rows["token_share"].to_numpy(dtype=float)
            if m < len(modalities) - 1 and np.isfinite(token_left).any():
                ax.scatter(
                    token_left, range(len(tasks)), marker="|", s=300, color="black", zorder=3
                )
        ax.set_xlim(0, 1)
        ax.invert_yaxis()
        ax.set_xlabel("share of the task's routing mass")
        ax.set_title(str(name), fontsize=9)
    axes[0].legend(loc="lower left", bbox_to_anchor=(0, 1.12), ncol=len(modalities), fontsize=8)
    fig.suptitle(title or "modality utilisation per task (| = token share)", fontsize=10)
    return save_figure(fig, Path(path))


def plot_modality_drop(frame: pd.DataFrame, path: str | Path, title: str | None = None) -> Path:
    """Modality competition: one panel per removed modality (``dropped``), grouped bars of
    ``drop`` (the metric with every modality minus the metric without it, ± ``drop_std`` if
    present) per ``metric``, one bar per ``model``."""
    dropped = list(dict.fromkeys(frame["dropped"]))
    models = list(dict.fromkeys(frame["model"]))
    metrics = list(dict.fromkeys(frame["metric"]))
    colours = pyplot().get_cmap("tab10")
    width = 0.8 / max(len(models), 1)
    size = min(14.0, max(5.0, 0.22 * len(models) * len(metrics) + 2.0))
    fig, axes = _panels(len(dropped), size, 3.0, cols=1)
    for ax, name in zip(axes, dropped, strict=True):
        part = frame[frame["dropped"] == name]
        for i, model in enumerate(models):
            rows = part[part["model"] == model].set_index("metric").reindex(metrics)
            x = np.arange(len(metrics)) + (i - (len(models) - 1) / 2) * width
            errors = rows["drop_std"].to_numpy(dtype=float) if "drop_std" in rows else None
            ax.bar(
                x,
                rows["drop"].to_numpy(dtype=float),
                width,
                yerr=errors,
                capsize=2,
                color=colours(i % 10),
                label=model,
            )
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(metrics)), metrics, rotation=20, ha="right")
        ax.set_ylabel("drop (with all − without)")
        ax.set_title(f"without {name}", fontsize=9)
    axes[0].legend(fontsize=7, ncol=min(len(models), 5), loc="upper right")
    fig.suptitle(
        title or "modality competition: metric drop when a modality is removed", fontsize=10
    )
    return save_figure(fig, Path(path))
