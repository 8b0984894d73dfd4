"""M4oE's analyses of a finished study (Wu et al., ICLR 2025, Fig. 4) and its Table 1 rows.

For every run of a study directory written by ``moekit sweep`` (``<variant>/seed-<s>/``):

- **modality competition** (Fig. 4a): the run evaluated with each modality removed from every
  test sample (:func:`moekit.engine.eval_run.evaluate_run` with ``drop_modalities``), and the
  drop of each task metric against the evaluation with all modalities; a model that reads only
  the removed modality has no input left and gets no value;
- **modality utilisation** (Fig. 4b): the share of each task's routing mass in the layers over
  several modalities' tokens (M4oE's MToE) that comes from each modality
  (:mod:`moekit.analysis.modality`), mean ± std over seeds;
- **per-patient utilisation**: the same share for each test sample, grouped by which modality
  of the patient carries the evidence, where the data folder holds the GAMMA replica's
  ``replica_truth.csv`` — whether a model reads the informative modality of each patient (the
  sample-dynamic fusion M4oE is built for).

Run as ``python -m moekit.projects.m4oe.analysis STUDY_DIR`` (writes ``STUDY_DIR/m4oe_analysis/``,
beside the variants' folders).
:data:`PAPER_TABLE1` holds the paper's Table 1 (accuracy %, the real datasets) as labelled
reference rows: they are not comparable with numbers measured on the replica.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from moekit.errors import ConfigError
from moekit.fileio import atomic_write_text

PAPER_SOURCE = "reported by M4oE (Wu et al., ICLR 2025, Table 1), real datasets, accuracy %"
PAPER_TABLE1: tuple[dict[str, Any], ...] = (
    {
        "setting": "multi-task, natural-image method (best)",
        "EMBED risk": 84.8,
        "EMBED density": 83.7,
        "RSNA BI-RADS": 73.9,
        "RSNA density": 77.1,
        "VinDr BI-RADS": 66.4,
        "VinDr density": 89.0,
        "GAMMA glaucoma": 70.4,
        "GAMMA seg.": 89.2,
    },
    {
        "setting": "multi-task, medical method (best)",
        "EMBED risk": 84.6,
        "EMBED density": 83.3,
        "RSNA BI-RADS": 73.4,
        "RSNA density": 76.8,
        "VinDr BI-RADS": 63.1,
        "VinDr density": 85.9,
        "GAMMA glaucoma": 66.4,
        "GAMMA seg.": 87.2,
    },
    {
        "setting": "M4oE",
        "EMBED risk": 85.9,
        "EMBED density": 84.1,
        "RSNA BI-RADS": 75.1,
        "RSNA density": 77.8,
        "VinDr BI-RADS": 66.7,
        "VinDr density": 89.6,
        "GAMMA glaucoma": 71.8,
        "GAMMA seg.": 90.4,
    },
)
"""The paper's Table 1 (accuracy in %), every row labelled with :data:`PAPER_SOURCE`."""

QUALITY_GROUPS = {
    (True, True): "both informative",
    (False, True): "fundus uninformative",
    (True, False): "OCT uninformative",
}


def paper_rows() -> pd.DataFrame:
    """:data:`PAPER_TABLE1` as a frame with a ``source`` column."""
    return pd.DataFrame([{**row, "source": PAPER_SOURCE} for row in PAPER_TABLE1])


def study_runs(
    study_dir: Path, variants: Sequence[str] | None = None
) -> list[tuple[str, int, Path]]:
    """``(variant, seed, run_dir)`` of every finished run (a ``checkpoints/best``), in the
    study's variant order (``study.json``) and seed order."""
    order = []
    parsed = study_dir / "study.json"
    if parsed.is_file():
        order = [v["name"] for v in json.loads(parsed.read_text())["variants"]]
    found = sorted(p.parent.parent for p in study_dir.glob("*/seed-*/checkpoints/best"))
    runs = []
    for run in found:
        variant, seed = run.parent.name, int(run.name.removeprefix("seed-"))
        if variants is None or variant in variants:
            runs.append((variant, seed, run))
    position = {name: i for i, name in enumerate(order)}
    runs.sort(key=lambda r: (position.get(r[0], len(position)), r[0], r[1]))
    if not runs:
        raise ConfigError(f"{study_dir}: no finished run (<variant>/seed-<s>/checkpoints/best)")
    return runs


def task_metrics(values: dict[str, float], split: str) -> dict[str, float]:
    """``{task/metric: value}`` of the dataset-level task metrics in ``evaluate_run`` values."""
    prefix = f"{split}/"
    return {
        k[len(prefix) :]: v
        for k, v in values.items()
        if k.startswith(prefix) and k.count("/") == 2 and not k.endswith("/loss")
    }


def competition(
    runs: Sequence[tuple[str, int, Path]],
    modalities: Sequence[str],
    split: str = "test",
    checkpoint: str = "best",
) -> pd.DataFrame:
    """Per run, removed modality and task metric: ``all``, ``without`` and ``drop = all −
    without`` (``without`` NaN where the model reads only the removed modality)."""
    from moekit.engine.eval_run import evaluate_run

    rows = []
    for variant, seed, run in runs:
        full = task_metrics(evaluate_run(run, split, checkpoint), split)
        for modality in modalities:
            try:
                values = evaluate_run(run, split, checkpoint, drop_modalities=[modality])
                without = task_metrics(values, split)
            except ConfigError:  # the model reads only this modality
                without = {}
            for metric, value in full.items():
                rest = without.get(metric, float("nan"))
                rows.append(
                    {
                        "model": variant,
                        "seed": seed,
                        "dropped": modality,
                        "metric": metric,
                        "all": value,
                        "without": rest,
                        "drop": value - rest,
                    }
                )
    return pd.DataFrame(rows)


def per_sample_shares(
    model: torch.nn.Module, loader: Any, layer: str, tasks: Sequence[str]
) -> pd.DataFrame:
    """Each sample's share of each task's routing mass in ``layer`` per modality: one row per
    (sample id, task, modality). Every sample runs every task (``task_mask=None``), so the
    layer's records hold ``T`` blocks of the batch's ``B`` (sample, task) sequences of ``N``
    tokens each (the models of this package)."""
    from moekit.analysis.modality import modality_names, token_mass
    from moekit.types import run_model

    rows = []
    model.eval()
    with torch.no_grad():
        for batch in loader:
            records = [r for r in run_model(model, batch).routing if r.layer == layer]
            if not records:
                continue
            record = records[0]
            names = modality_names(model, batch.modalities)
            batch_size, num_tasks = batch.batch_size, len(tasks)
            mass = token_mass(record).view(num_tasks, batch_size, -1)
            if record.valid is not None:
                mass = mass * record.valid.reshape(mass.shape).double()
            ids = record.modality_ids.reshape(num_tasks, batch_size, -1)[0, 0]
            total = mass.sum(dim=2).clamp(min=1e-12)
            for m, name in enumerate(names):
                share = mass[:, :, ids == m].sum(dim=2) / total
                for t, task in enumerate(tasks):
                    for b, sample in enumerate(batch.meta["id"]):
                        rows.append(
                            {"id": str(sample), "task": task, "modality": name,
                             "share": float(share[t, b])}
                        )  # fmt: skip
    return pd.DataFrame(rows)


def utilisation(
    runs: Sequence[tuple[str, int, Path]], split: str = "test", checkpoint: str = "best"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(utilisation, by_quality)``: the modality utilisation of every run's layers over
    several modalities (:meth:`~moekit.analysis.modality.ModalityUsage.to_frame` with
    ``model`` and ``seed``), and, where the data folder holds ``replica_truth.csv``, the mean
    per-sample share of each modality by patient group (:data:`QUALITY_GROUPS`)."""
    from moekit.analysis.runs import TrainedRun
    from moekit.analysis.usage import collect_usage
    from moekit.sections import settings

    frames, groups = [], []
    for variant, seed, run in runs:
        trained = TrainedRun.load(run, checkpoint)
        loader = trained.loader(split)
        usage = collect_usage(trained.model, loader, list(trained.tasks))
        if usage.modality is None:
            continue
        frame = usage.modality.to_frame()
        if not len(frame):
            continue
        frames.append(frame.assign(model=variant, seed=seed))
        root = Path(settings(trained.cfg, "data")[split]["root"])
        truth_file = root / "replica_truth.csv"
        if not truth_file.is_file():
            continue
        truth = pd.read_csv(truth_file, dtype={"id": str})
        on_disk = "test" if split == "test" else "train"
        both = truth["has_fundus"].astype(bool) & truth["has_oct"].astype(bool)
        truth = truth[(truth["split"] == on_disk) & both]
        for layer in dict.fromkeys(frame["layer"]):
            shares = per_sample_shares(trained.model, loader, layer, list(trained.tasks))
            joined = shares.merge(truth, on="id")
            joined["group"] = [
                QUALITY_GROUPS.get((bool(f), bool(o)), "other")
                for f, o in zip(joined["fundus_informative"], joined["oct_informative"])
            ]
            mean = joined.groupby(["task", "group", "modality"], sort=False)["share"].mean()
            groups.append(mean.reset_index().assign(model=variant, seed=seed, layer=layer))
    utilisation_frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    quality = pd.concat(groups, ignore_index=True) if groups else pd.DataFrame()
    return utilisation_frame, quality


def mean_std(frame: pd.DataFrame, keys: Sequence[str], value: str) -> pd.DataFrame:
    """``value`` averaged over seeds per ``keys``: columns ``value`` (mean), ``value_std``
    (sample std; NaN with one seed) and ``seeds``."""
    grouped = frame.groupby(list(keys), sort=False)[value]
    out = grouped.mean().rename(value).to_frame()
    out[f"{value}_std"] = grouped.std(ddof=1)
    out["seeds"] = grouped.count()
    return out.reset_index()


def _markdown(frame: pd.DataFrame, value: str, index: str, columns: Sequence[str]) -> str:
    """A pivot of ``value ± value_std`` as a markdown table."""
    cells = frame.assign(
        cell=[
            "–" if pd.isna(m) else (f"{m:.3f}" if pd.isna(s) else f"{m:.3f} ± {s:.3f}")
            for m, s in zip(frame[value], frame[f"{value}_std"])
        ]
    )
    table = cells.pivot_table(index=index, columns=list(columns), values="cell", aggfunc="first",
                              sort=False)  # fmt: skip
    header = [index, *[" / ".join(map(str, c)) if isinstance(c, tuple) else str(c)
                       for c in table.columns]]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in table.iterrows():
        lines.append("| " + " | ".join([f"`{name}`", *[str(v) for v in row.fillna("–")]]) + " |")
    return "\n".join(lines) + "\n"


def report(
    study_dir: str | Path,
    variants: Sequence[str] | None = None,
    modalities: Sequence[str] = ("fundus", "oct"),
    split: str = "test",
    checkpoint: str = "best",
) -> Path:
    """Write the competition and utilisation tables and figures of a study into
    ``STUDY_DIR/m4oe_analysis/`` (CSV per run, markdown and PNG of the means over seeds) and the
    paper's Table 1 reference rows; returns that folder."""
    from moekit.analysis.figures import plot_modality_drop, plot_modality_utilisation

    study_dir = Path(study_dir)
    out = study_dir / "m4oe_analysis"
    runs = study_runs(study_dir, variants)
    drops = competition(runs, modalities, split, checkpoint)
    atomic_write_text(out / "competition.csv", drops.to_csv(index=False))
    drop_mean = mean_std(drops, ["model", "dropped", "metric"], "drop")
    plot_modality_drop(drop_mean, out / "figures" / "competition.png")
    text = ["# Modality competition: metric drop when a modality is removed", ""]
    text.append(_markdown(drop_mean, "drop", "model", ["dropped", "metric"]))
    used, quality = utilisation(runs, split, checkpoint)
    if len(used):
        atomic_write_text(out / "utilisation.csv", used.to_csv(index=False))
        share = mean_std(used, ["model", "layer", "task", "modality"], "share")
        tokens = used.groupby(["model", "layer", "task", "modality"], sort=False)["token_share"]
        share["token_share"] = tokens.mean().to_numpy()
        share["panel"] = share["model"] + " " + share["layer"]
        plot_modality_utilisation(share, out / "figures" / "utilisation.png", panel="panel")
        text += ["# Modality utilisation: share of each task's routing mass", ""]
        text.append(_markdown(share, "share", "model", ["task", "modality"]))
    if len(quality):
        atomic_write_text(out / "utilisation_by_patient.csv", quality.to_csv(index=False))
        grouped = mean_std(quality, ["model", "task", "group", "modality"], "share")
        first = grouped[grouped["task"] == grouped["task"].iloc[0]]
        text += [f"# Per-patient utilisation ({first['task'].iloc[0]}) by informative modality", ""]
        text.append(_markdown(first, "share", "model", ["group", "modality"]))
        by_group = first.drop(columns="task").rename(columns={"group": "task"})
        plot_modality_utilisation(
            by_group.assign(token_share=float("nan")),
            out / "figures" / "utilisation_by_patient.png",
            panel="model",
            title=f"{first['task'].iloc[0]}: share of the routing mass per modality, by patient",
        )
    reference = paper_rows()
    text += ["# The paper's Table 1 (reference rows, not comparable)", ""]
    text.append(reference.to_markdown(index=False) + "\n")
    atomic_write_text(out / "analysis.md", "\n".join(text))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moekit.projects.m4oe.analysis",
        description="Modality competition and utilisation of a finished M4oE study "
        "(writes STUDY_DIR/m4oe_analysis/).",
    )
    parser.add_argument("study_dir", help="a study directory written by moekit sweep")
    parser.add_argument("--variants", nargs="+", help="the variants to analyse (default: all)")
    parser.add_argument("--modalities", nargs="+", default=["fundus", "oct"])
    parser.add_argument("--split", default="test")
    parser.add_argument("--checkpoint", default="best", choices=("best", "last"))
    args = parser.parse_args(argv)
    out = report(args.study_dir, args.variants, args.modalities, args.split, args.checkpoint)
    print((out / "analysis.md").read_text())
    print(f"saved: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
