"""``moekit prune``: extract one task of a trained run as a standalone, smaller model.

:class:`TaskExtraction` loads the run once, counts expert usage on the profiling split
(every sample runs every task) and measures the full model; :meth:`TaskExtraction.extract`
applies one rule (:func:`moekit.analysis.extraction.prune_model`), saves the model and reports

- parameters, before (the whole multi-task model, and ``T``'s part of it: the shared layers,
  every expert, ``T``'s head and gate rows) and after;
- active parameters per token and FLOPs per image (multiply-adds, experts that ran only) on
  the first profiling batch, before and after, both for ``T`` alone: "before" is the full model
  reduced to ``T`` by ``single_task`` (:func:`moekit.analysis.flops.task_alone`), so other
  tasks' heads and gate rows count in neither column;
- the task's first metric on the evaluation split (``moekit eval`` of both models);
- the maximum absolute difference of ``T``'s outputs over the profiling split (0 up to float
  rounding at ``θ = 0``).

The saved directory has a run's layout, so ``moekit eval OUT`` and
``moekit.engine.load_model(OUT)`` accept it::

    OUT/config.yaml                      resolved config (model.type: pruned, tasks: T only)
    OUT/checkpoints/best/model.safetensors, config.yaml, trainer_state.json
    OUT/usage/                           the usage the experts were chosen from
    OUT/prune.json, OUT/prune.csv        the report and its table

:meth:`TaskExtraction.sweep` runs a list of thresholds and keep-top fractions and draws the
extraction curve (metric against parameters; Mod-Squad's Fig. 3).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import save_model
from torch import nn

from moekit import config as config_io
from moekit.analysis.extraction import check_rule, prune_model, pruned_config
from moekit.analysis.flops import (
    UNIT,
    active_parameters,
    count_flops,
    count_parameters,
    routing_records,
    task_alone,
)
from moekit.analysis.runs import TrainedRun, check_task, input_batch_size, only_task, progress
from moekit.analysis.usage import ExpertUsage, collect_usage
from moekit.engine import checkpoint as ckpt_io
from moekit.engine.rundir import json_safe
from moekit.errors import ConfigError
from moekit.fileio import atomic_write_text, replace_dir
from moekit.moe import moe_layers
from moekit.sections import settings
from moekit.types import run_model

PAPER_THRESHOLDS = (0.0, 0.001, 0.05, 0.2, 0.5, 0.9)
"""θ of Mod-Squad's Fig. 3 (0%, 0.1%, 5%, 20%, 50%, 90%): usage frequencies
``count[T, e] / tokens[T]`` (:func:`moekit.analysis.extraction.experts_to_keep`), so each value
keeps a different set of experts."""
PAPER_KEEP_TOPS = (0.3, 0.4, 0.6, 0.8, 1.0)
"""H of Mod-Squad's Fig. 3 (30% ... 100%)."""


def rule_name(threshold: float | None, keep_top: float | None, reduce_k: bool) -> str:
    """``theta0.01``, ``top40``, with ``-k`` when ``k`` is reduced."""
    name = f"theta{threshold:g}" if threshold is not None else f"top{keep_top * 100:g}"
    return name + ("-k" if reduce_k else "")


def claim_output(out: Path, source: Path, overwrite: bool) -> None:
    """Check that ``out`` may be written: never the source run (or a folder holding it), and
    an existing ``out`` only with ``overwrite`` (a command replaces only what it was told to)."""
    out_abs, source_abs = out.resolve(), source.resolve()
    if out_abs == source_abs or out_abs in source_abs.parents:
        raise ConfigError(f"--out {out}: that is the source run (or holds it); choose a new folder")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a folder")
    if out.exists() and not overwrite:
        raise ConfigError(f"--out {out}: already exists; pass --overwrite to replace it")


def save_pruned(out: Path, model: nn.Module, cfg: dict[str, Any], source: Path) -> Path:
    """Write the extracted model as a run directory (replacing ``out`` atomically: the caller
    claimed it with :func:`claim_output`)."""
    staging = out.with_name(f".{out.name}.tmp")
    if staging.exists():
        shutil.rmtree(staging)
    best = staging / "checkpoints" / "best"
    best.mkdir(parents=True)
    save_model(model, str(best / ckpt_io.MODEL_FILE))
    config_io.save(cfg, staging / ckpt_io.CONFIG_FILE)
    config_io.save(cfg, best / ckpt_io.CONFIG_FILE)
    state = ckpt_io.read_state(source) if (source / ckpt_io.STATE_FILE).is_file() else {}
    (best / ckpt_io.STATE_FILE).write_text(json.dumps({**state, "pruned_from": str(source)}))
    out.parent.mkdir(parents=True, exist_ok=True)
    return replace_dir(staging, out)


def layer_table(full: nn.Module, pruned: nn.Module) -> list[dict[str, Any]]:
    """Per MoE layer of the extracted model: experts and ``k`` before and after."""
    before = dict(moe_layers(full))
    rows = []
    for name, layer in moe_layers(pruned):
        rows.append(
            {
                "layer": name,
                "experts_before": before[name].num_experts,
                "experts_after": layer.num_experts,
                "kept": layer.expert_ids,
                "k_before": getattr(before[name].router, "k", None),
                "k_after": getattr(layer.router, "k", None),
            }
        )
    return rows


def format_report(report: dict[str, Any]) -> str:
    """The report as a plain-text table."""

    def ratio(a: float, b: float) -> str:
        return f"{b / a:.3f}" if a else ""

    rows = [
        ("parameters", report["params_before"], report["params_after"]),
        (
            f"parameters of '{report['task']}' alone",
            report["params_task_before"],
            report["params_after"],
        ),
        (
            "active parameters / token",
            report["active_params_before"],
            report["active_params_after"],
        ),
        ("FLOPs / image", report["flops_before"], report["flops_after"]),
        ("experts (MoE layers)", report["experts_before"], report["experts_after"]),
    ]
    frame = pd.DataFrame(
        [
            {"": name, "before": f"{a:,}", "after": f"{b:,}", "after/before": ratio(a, b)}
            for name, a, b in rows
        ]
        + [
            {
                "": report["metric"],
                "before": f"{report['metric_before']:.4f}",
                "after": f"{report['metric_after']:.4f}",
                "after/before": "",
            },
            {
                "": f"max |output diff| ({report['profile_split']})",
                "before": "",
                "after": f"{report['max_abs_diff']:.3g}",
                "after/before": "",
            },
        ]
    )
    head = (
        f"task '{report['task']}' of {report['run']} ({report['checkpoint']}), "
        f"rule {report['rule']}; FLOPs in {UNIT}"
    )
    return f"{head}\n{frame.to_string(index=False)}\nsaved: {report['out']}"


class TaskExtraction:
    """Extract task ``task`` from a run (see the module docstring).

    Args:
        run_dir: a run directory (or an extracted one).
        task: the task to keep.
        split: the split the metric is computed on.
        profile_split: the split expert usage is counted and outputs are compared on.
        checkpoint: ``best`` or ``last``.
        usage: a ``usage.safetensors`` (or its folder) to use instead of counting.
    """

    def __init__(
        self,
        run_dir: str | Path,
        task: str,
        split: str = "test",
        profile_split: str = "val",
        checkpoint: str = "best",
        usage: str | Path | None = None,
    ) -> None:
        self.run = TrainedRun.load(run_dir, checkpoint)
        check_task(list(self.run.tasks), task, run_dir)
        if not moe_layers(self.run.model):
            raise ConfigError(f"{run_dir}: the model has no MoE layer; there is no expert to drop")
        self.task, self.split, self.profile_split = task, split, profile_split
        self.profile = self.run.loader(profile_split)
        self.usage = (
            ExpertUsage.load(usage)
            if usage is not None
            else collect_usage(
                self.run.model,
                self.profile,
                list(self.run.tasks),
                progress=progress(f"usage {profile_split}"),
                info={"split": profile_split, "checkpoint": checkpoint},
            )
        )
        self.inputs = next(iter(self.profile))
        self.spec = self.run.tasks[task].metrics[0] if self.run.tasks[task].metrics else None
        single, mask = task_alone(self.run.model, self.inputs, list(self.run.tasks), task)
        measured = self._measure(single, mask)
        self.before = {
            **measured,
            "params": count_parameters(self.run.model),
            "params_task": measured["params"],
        }

    @property
    def metric(self) -> str:
        """The reported metric, ``<split>/<task>/<first metric>`` (or the task's loss)."""
        return f"{self.split}/{self.task}/{self.spec.name if self.spec else 'loss'}"

    def _measure(self, model: nn.Module, task_mask: dict | None) -> dict[str, Any]:
        """Parameters, active parameters and FLOPs for ``T`` alone, and ``T``'s metric on the
        evaluation split (one evaluation of the model in memory)."""
        from moekit.engine.evaluation import evaluate_model

        tasks = {self.task: self.run.tasks[self.task]}
        threshold = settings(self.run.cfg, "eval")["threshold"]
        values = evaluate_model(model, self.run.loader(self.split), tasks, threshold, "cpu")
        records = routing_records(model, self.inputs, task_mask)
        flops = count_flops(model, self.inputs, task_mask).total
        return {
            "params": count_parameters(model),
            "active_params": active_parameters(model, records),
            "flops": round(flops / input_batch_size(self.inputs)),
            "experts": sum(layer.num_experts for _, layer in moe_layers(model)),
            "metric": values[self.metric.split("/", 1)[1]],
        }

    def max_abs_diff(self, pruned: nn.Module) -> float:
        """Largest ``|full(x)[T] - pruned(x)[T]|`` over the profiling split."""
        diff = 0.0
        with torch.no_grad():
            for batch in progress(f"compare {self.profile_split}")(self.profile):
                mask = only_task(self.run.tasks, self.task, batch.batch_size, "cpu")
                full = run_model(self.run.model, batch, mask).preds[self.task]
                small = run_model(pruned, batch).preds[self.task]
                diff = max(diff, float((full - small).abs().max()))
        return diff

    def extract(
        self,
        threshold: float | None = None,
        keep_top: float | None = None,
        reduce_k: bool = False,
        out: str | Path | None = None,
        overwrite: bool = False,
    ) -> dict[str, Any]:
        """Apply one rule, save the model to ``out`` (an existing ``out`` only with
        ``overwrite``) and return the report."""
        from moekit.engine import load_model

        check_rule(threshold, keep_top)
        rule = rule_name(threshold, keep_top, reduce_k)
        out = Path(out) if out is not None else self.run.path / "pruned" / f"{self.task}-{rule}"
        claim_output(out, self.run.path, overwrite)
        pruned, specs = prune_model(
            self.run.model, self.usage, self.task, threshold, keep_top, reduce_k
        )
        cfg = pruned_config(self.run.cfg, self.task, specs)
        source = ckpt_io.checkpoint_dir(self.run.path, self.run.checkpoint)
        save_pruned(out, pruned, cfg, source)
        self.usage.save(out / "usage")
        reloaded, _, _ = load_model(out)
        after = self._measure(reloaded, None)
        report = {
            "run": str(self.run.path),
            "checkpoint": self.run.checkpoint,
            "task": self.task,
            "rule": rule,
            "threshold": threshold,
            "keep_top": keep_top,
            "reduce_k": reduce_k,
            "profile_split": self.profile_split,
            "split": self.split,
            "metric": self.metric,
            "higher_is_better": self.spec.higher_is_better if self.spec else False,
            "flops_unit": f"per image, {UNIT}",
            **{f"{k}_before": v for k, v in self.before.items()},
            **{f"{k}_after": v for k, v in after.items()},
            "max_abs_diff": self.max_abs_diff(reloaded),
            "out": str(out),
            "layers": layer_table(self.run.model, reloaded),
        }
        atomic_write_text(out / "prune.json", json.dumps(json_safe(report), indent=2) + "\n")
        table = {k: v for k, v in report.items() if k != "layers"}
        atomic_write_text(out / "prune.csv", pd.DataFrame([table]).to_csv(index=False))
        return report

    def sweep(
        self,
        thresholds: Iterable[float] = PAPER_THRESHOLDS,
        keep_tops: Iterable[float] = PAPER_KEEP_TOPS,
        reduce_k: bool = False,
        out: str | Path | None = None,
        overwrite: bool = False,
    ) -> tuple[pd.DataFrame, Path]:
        """Extract with every threshold and keep-top fraction; write ``sweep.csv`` and the
        extraction curve ``pruning_curve.png`` into ``out``. Returns the table and the figure."""
        from moekit.analysis.figures import plot_pruning_curve

        root = Path(out) if out is not None else self.run.path / "pruned" / f"{self.task}-sweep"
        claim_output(root, self.run.path, overwrite)
        if root.exists():
            shutil.rmtree(root)  # claimed: the user asked to replace it
        rules = [(t, None) for t in thresholds] + [(None, h) for h in keep_tops]
        rows = []
        for threshold, keep_top in rules:
            name = rule_name(threshold, keep_top, reduce_k)
            report = self.extract(threshold, keep_top, reduce_k, root / name, overwrite=True)
            rows.append({k: v for k, v in report.items() if k != "layers"})
        frame = pd.DataFrame(rows)
        atomic_write_text(root / "sweep.csv", frame.to_csv(index=False))
        figure = plot_pruning_curve(frame, root / "pruning_curve.png")
        return frame, figure
