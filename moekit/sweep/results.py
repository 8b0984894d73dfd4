"""The results of a study: one table row per variant, a bar chart per column.

``results.csv`` holds, per variant, the number of seeds that finished, the status, and per
column the mean and the standard deviation over seeds (``<label>`` and ``<label> std``;
sample std, ``ddof = 1``; empty with one seed). ``results.md`` shows ``mean ± std`` and lists
the errors of failed variants below the table. A best value (by the column's direction: a task
metric's own, lower for FLOPs and parameters, higher for Δ; columns without a direction mark
nothing) is marked, in bold in the table and red in the chart, only where it is clear of the
others (:func:`separated_best`): with one seed, or overlapping intervals, nothing is marked.
``figures/<column>.png`` is a bar chart per column, error bars where a variant ran with
several seeds.

A ``delta`` column is the multi-task Δ (Maninis et al. 2019; Mod-Squad's Δ_t) of each run
against the mean over seeds of the named baseline variants, in percent, with the variant
(``pooled`` by default) in the column's output: ``Δ_t = (−1)^{s_t} (M_t − B_t) / B_t``.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from moekit.fileio import atomic_write_text
from moekit.sweep.measure import ANALYSIS_KINDS, cache_entry
from moekit.sweep.runner import read_status, run_state
from moekit.sweep.study import Column, Study

FIGURES = "figures"


def _run_value(column: Column, entry: Mapping[str, Any], baselines: Mapping[str, float]) -> float:
    metrics = entry.get("metrics") or {}
    if column.kind == "metric":
        value = metrics.get(column.arg)
    elif column.kind in ANALYSIS_KINDS:
        value = (entry.get("analysis") or {}).get(column.key())
    else:
        value = _delta(column, metrics, entry.get("directions") or {}, baselines)
    return math.nan if value is None else float(value)


def _delta(
    column: Column,
    metrics: Mapping[str, Any],
    directions: Mapping[str, bool],
    baselines: Mapping[str, float],
) -> float:
    from moekit.metrics.mtl_delta import MultiTaskDelta

    keys = list(column.arg["baselines"])
    base = {key: baselines.get(f"{column.label}::{key}", math.nan) for key in keys}
    if any(not math.isfinite(v) or v == 0 for v in base.values()):
        return math.nan
    if any(key not in directions for key in keys):  # the run lacks one of the tasks
        return math.nan
    variant = column.arg.get("variant", "pooled")
    values = {k: math.nan if metrics.get(k) is None else float(metrics[k]) for k in keys}
    return MultiTaskDelta(base, variant)(values, dict(directions))[variant]


def _baselines(study: Study) -> dict[str, float]:
    """``{"<column>::<task/metric>": mean over seeds of the baseline variant's value}``."""
    values: dict[str, float] = {}
    for column in study.columns:
        if column.kind != "delta":
            continue
        for key, source in column.arg["baselines"].items():
            found = [
                metric
                for seed in study.seeds
                if (
                    metric := (
                        cache_entry(study.run_dir(source, seed), study.evaluate).get("metrics")
                        or {}
                    ).get(key)
                )
                is not None
            ]
            values[f"{column.label}::{key}"] = statistics.fmean(found) if found else math.nan
    return values


def run_rows(study: Study) -> pd.DataFrame:
    """One row per (variant, seed): status, error and every column's value."""
    status = read_status(study)
    baselines = _baselines(study)
    rows = []
    for variant, seed, run_dir in study.runs():
        outcome = status.get(f"{variant.name}/{seed}", {})
        entry = cache_entry(run_dir, study.evaluate)
        state = outcome.get("status") or run_state(variant, run_dir)
        row: dict[str, Any] = {
            "variant": variant.name,
            "seed": seed,
            "status": "completed" if state == "completed" and entry else state,
            "error": outcome.get("error"),
        }
        for column in study.columns:
            row[column.label] = _run_value(column, entry, baselines) if entry else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def column_directions(study: Study) -> dict[str, bool | None]:
    """Whether each column is better higher (``None``: no best value)."""
    directions = {}
    for column in study.columns:
        direction = column.higher_is_better
        if direction is None and column.kind == "metric":
            for _, _, run_dir in study.runs():
                known = cache_entry(run_dir, study.evaluate).get("directions") or {}
                if column.arg in known:
                    direction = bool(known[column.arg])
                    break
            if direction is None and str(column.arg).split("/")[-1] == "loss":
                direction = False
        directions[column.label] = direction
    return directions


def summarize(study: Study, rows: pd.DataFrame) -> pd.DataFrame:
    """One row per variant: seeds finished, status, and mean / std of each column."""
    summary = []
    for variant in study.variants:
        runs = rows[rows["variant"] == variant.name]
        done = runs[runs["status"] == "completed"]
        failed = runs[runs["status"] == "failed"]
        if len(done) == len(runs):
            status = "completed"
        elif len(failed):
            status = "failed"
        elif (runs["status"] == "interrupted").any():
            status = "interrupted"
        else:
            status = "partial" if len(done) else "pending"
        row: dict[str, Any] = {
            "variant": variant.name,
            "runs": f"{len(done)}/{len(runs)}",
            "status": status,
        }
        for column in study.columns:
            values = [v for v in done[column.label] if math.isfinite(v)]
            row[column.label] = statistics.fmean(values) if values else math.nan
            row[f"{column.label} std"] = statistics.stdev(values) if len(values) > 1 else math.nan
        errors = [e for e in failed["error"] if isinstance(e, str) and e]
        row["error"] = errors[0] if errors else ""
        summary.append(row)
    return pd.DataFrame(summary)


def _format(mean: float, std: float) -> str:
    if not math.isfinite(mean):
        return "–"
    if abs(mean) < 1e-12:  # rounding noise, e.g. a baseline's Δ against itself
        mean = 0.0
    text = f"{mean:.4g}"
    return f"{text} ± {std:.2g}" if math.isfinite(std) else text


def markdown(study: Study, frame: pd.DataFrame, directions: Mapping[str, bool | None]) -> str:
    """The results table as markdown (a separated best in bold, errors listed below)."""
    seeds = _seeds_finished(frame)
    best = {label: separated_best(frame, label, directions[label], seeds) for label in directions}
    labels = [c.label for c in study.columns]
    arrows = {True: " ↑", False: " ↓", None: ""}
    header = ["variant", "runs", *(f"{label}{arrows[directions[label]]}" for label in labels)]
    lines = [
        f"Study `{study.name}`"
        + (f" (profile `{study.profile}`)" if study.profile else "")
        + f": {study.evaluate['split']} split, `{study.evaluate['checkpoint']}` checkpoint, "
        f"seeds {', '.join(map(str, study.seeds))}; mean ± std over seeds; in bold a best "
        "mean whose interval is clear of every other variant's (none with one seed).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * 2 + "---:|" * len(labels),
    ]
    for _, row in frame.iterrows():
        cells = [f"`{row['variant']}`", row["runs"]]
        for label in labels:
            text = _format(row[label], row[f"{label} std"])
            cells.append(f"**{text}**" if best.get(label) == row["variant"] else text)
        lines.append("| " + " | ".join(cells) + " |")
    failed = frame[frame["error"] != ""]
    if len(failed):
        lines += ["", "Failed:"]
        lines += [f"- `{r['variant']}`: {r['error']}" for _, r in failed.iterrows()]
    return "\n".join(lines) + "\n"


def separated_best(
    frame: pd.DataFrame, label: str, higher: bool | None, seeds: Mapping[str, int]
) -> str | None:
    """The variant a chart marks best in column ``label``: the best mean, only when it ran with
    several seeds and its interval (mean ± std) lies clear of every other variant's (a variant
    with one seed counts as its value). With one seed, or overlapping intervals, the
    difference is within the noise and no bar is marked."""
    values = frame[frame[label].map(math.isfinite)]
    if higher is None or len(values) < 2:
        return None
    index = values[label].idxmax() if higher else values[label].idxmin()
    best = values.loc[index]
    spread = values[f"{label} std"].fillna(0.0)
    if seeds.get(best["variant"], 0) < 2 or not math.isfinite(best[f"{label} std"]):
        return None
    others = values.drop(index)
    if higher:
        clear = (best[label] - spread[index]) > (others[label] + spread.drop(index)).max()
    else:
        clear = (best[label] + spread[index]) < (others[label] - spread.drop(index)).min()
    return str(best["variant"]) if clear else None


def _seeds_finished(frame: pd.DataFrame) -> dict[str, int]:
    """``{variant: seeds finished}`` from the ``runs`` column (``"2/3"``)."""
    return {row["variant"]: int(str(row["runs"]).split("/")[0]) for _, row in frame.iterrows()}


def plot_columns(
    study: Study, frame: pd.DataFrame, directions: Mapping[str, bool | None], out_dir: Path
) -> list[Path]:
    """A bar chart per column with a value: the mean over seeds, error bars (± std) only for
    variants with several seeds, and the best bar in red only where it is clear of the others
    (:func:`separated_best`); the subtitle says which case the chart shows."""
    from moekit.analysis.figures import pyplot, save_figure
    from moekit.engine.curves import figure_name

    plt = pyplot()
    seeds = _seeds_finished(frame)
    written = []
    for column in study.columns:
        label = column.label
        shown = frame[frame[label].map(math.isfinite)]
        if shown.empty:
            continue
        names = list(shown["variant"])
        values = list(shown[label])
        errors = [e if math.isfinite(e) else math.nan for e in shown[f"{label} std"]]
        best = separated_best(shown, label, directions[label], seeds)
        fig, ax = plt.subplots(figsize=(max(4.5, 0.75 * len(names) + 1.5), 3.8))
        colours = ["tab:red" if best == n else "tab:blue" for n in names]
        ax.bar(range(len(names)), values, color=colours)
        spread = [(i, v, e) for i, (v, e) in enumerate(zip(values, errors, strict=True)) if e > 0]
        if spread:
            xs, ys, es = zip(*spread, strict=True)
            ax.errorbar(xs, ys, yerr=es, fmt="none", ecolor="black", capsize=3, linewidth=1)
        for i, (value, error) in enumerate(zip(values, errors, strict=True)):
            reach = error if error > 0 else 0.0
            top = value + reach if value >= 0 else value - reach
            ax.annotate(
                f"{value:.3g}",
                (i, top),
                ha="center",
                va="bottom" if value >= 0 else "top",
                fontsize=8,
                xytext=(0, 2 if value >= 0 else -2),
                textcoords="offset points",
            )
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=9)
        arrow = {True: " (higher is better)", False: " (lower is better)", None: ""}
        most = max(seeds.get(n, 0) for n in names)
        if most < 2:
            note = "one seed: no error bars, no best marked"
        elif best is None:
            note = f"mean ± std over up to {most} seeds; no variant is clear of the others"
        else:
            note = f"mean ± std over up to {most} seeds; red: best, clear of the others"
        ax.set_ylabel(label)
        ax.set_title(f"{study.name}: {label}{arrow[directions[label]]}\n{note}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.12)
        written.append(save_figure(fig, out_dir / figure_name(label)))
    return written


def plot_extraction_curves(study: Study, out_dir: Path) -> list[Path]:
    """The extraction curve (Mod-Squad Fig. 3) of every (source, task) the study extracts from,
    from the reports of its extraction variants (first seed)."""
    from moekit.analysis.figures import plot_pruning_curve

    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for variant in study.variants:
        spec = variant.prune
        report = study.run_dir(variant.name, study.seeds[0]) / "prune.json"
        if spec is None or not report.is_file():
            continue
        data = json.loads(report.read_text())
        data.pop("layers", None)
        groups.setdefault((spec.source, spec.task), []).append(data)
    return [
        plot_pruning_curve(pd.DataFrame(reports), out_dir / f"pruning_curve-{source}-{task}.png")
        for (source, task), reports in groups.items()
    ]


def write_results(study: Study) -> dict[str, Any]:
    """Write ``results.csv``, ``results.md`` and the figures; returns the table and paths."""
    rows = run_rows(study)
    frame = summarize(study, rows)
    directions = column_directions(study)
    directory = study.directory
    text = markdown(study, frame, directions)
    atomic_write_text(directory / "results.csv", frame.to_csv(index=False))
    atomic_write_text(directory / "results.md", text)
    figures = plot_columns(study, frame, directions, directory / FIGURES)
    figures += plot_extraction_curves(study, directory / FIGURES)
    return {"frame": frame, "markdown": text, "figures": figures}
