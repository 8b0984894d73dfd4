"""Model artifacts: a trained model in a folder that predicts without its run or its dataset.

``moekit export RUN --out DIR`` (:func:`export_run`) writes::

    DIR/model.safetensors   the weights
    DIR/config.yaml         the resolved config (pretrained-weight paths cleared: the
                            weights replace any initialisation)
    DIR/artifact.json       format and moekit version, the source run and checkpoint, the
                            tasks (kinds, class names), the decision thresholds, the input
                            pipeline (modalities, preprocessing, normalisation), every MoE
                            layer's experts and router (the routing phase the checkpoint was
                            saved in), the cost (parameters, FLOPs), the metrics, the
                            extraction (with --task) and the programs written
    DIR/model_card.md       the same for people (:mod:`moekit.inference.model_card`)
    DIR/model.pt2, DIR/model.torchscript.pt
                            with --format, when faithful (:mod:`moekit.inference.program`)

With ``task``, the model is the subnetwork of that task extracted by expert usage
(:class:`moekit.analysis.extraction_report.TaskExtraction`, the ``moekit prune`` machinery:
``threshold`` θ or ``keep_top`` H, ``reduce_k``); at θ = 0 its outputs equal the full model's
for the task. :func:`load_artifact` reads a folder back (``moekit predict DIR`` does);
exporting checks that the folder, loaded back, gives the model's outputs exactly.

The input pipeline is read off the run's dataset (:func:`moekit.inference.inputs.
pipeline_from_config`), so exporting needs the run's data where its config says; predicting
with the artifact does not.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model
from torch import nn

import moekit
from moekit import config as config_io
from moekit.analysis.extraction_report import TaskExtraction, claim_output
from moekit.analysis.flops import active_parameters, count_flops, count_parameters, routing_records
from moekit.analysis.runs import check_task
from moekit.data.collate import collate_samples
from moekit.engine import checkpoint as ckpt_io
from moekit.engine.rundir import json_safe
from moekit.errors import CheckpointError, ConfigError
from moekit.fileio import atomic_write_text, replace_dir
from moekit.inference.inputs import InputPipeline, pipeline_from_config
from moekit.inference.model_card import model_card
from moekit.inference.predictor import Predictor, decision_thresholds
from moekit.inference.program import FORMATS, export_program
from moekit.models.pruned import apply_layer_specs, layer_spec
from moekit.moe import moe_layers
from moekit.types import Batch, Task, run_model, tasks_from_config

FORMAT = "moekit-artifact"
FORMAT_VERSION = 1
RECORD_FILE = "artifact.json"
CARD_FILE = "model_card.md"
WEIGHTS_FILE = ckpt_io.MODEL_FILE
CONFIG_FILE = ckpt_io.CONFIG_FILE
CHECK_INPUTS = 4
"""Inputs of the run's data on which an export is checked (loaded back, programs)."""
METRIC_SKIP = ("loss", "weight", "objective", "time", "lr")
"""Columns of a run's values that are not metrics (left out of the card)."""


@dataclass
class Artifact:
    """A loaded artifact: the model (eval mode) with everything ``predict`` needs."""

    path: Path
    model: nn.Module
    config: dict[str, Any]
    tasks: dict[str, Task]
    pipeline: InputPipeline
    thresholds: dict[str, list[float]]
    record: dict[str, Any]

    def predictor(self, tta: str = "none", device: str | torch.device = "cpu") -> Predictor:
        """A :class:`~moekit.inference.predictor.Predictor` of this artifact."""
        return Predictor(self.model, self.tasks, self.pipeline, self.thresholds, tta, device)


def is_artifact(path: str | Path) -> bool:
    """Whether ``path`` is an artifact folder (it holds ``artifact.json``)."""
    return (Path(path) / RECORD_FILE).is_file()


def load_artifact(path: str | Path, device: str | torch.device = "cpu") -> Artifact:
    """Load an artifact folder written by :func:`export_run` (no run, no dataset needed)."""
    from moekit.engine.experiment import build_model
    from moekit.registry import import_user_modules

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such artifact folder")
    file = path / RECORD_FILE
    try:
        record = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not a moekit artifact (no {RECORD_FILE})") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: unreadable ({exc})") from None
    if record.get("format") != FORMAT or int(record.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{file}: not a {FORMAT} of version <= {FORMAT_VERSION} (moekit {moekit.__version__})"
        )
    cfg = config_io.read_yaml(path / CONFIG_FILE)
    import_user_modules(cfg)
    tasks = tasks_from_config(cfg)
    model = build_model(cfg, tasks)
    ckpt_io.load_weights(model, path / WEIGHTS_FILE)
    apply_layer_specs(model, record.get("layers") or {})
    return Artifact(
        path,
        model.to(device).eval(),
        cfg,
        tasks,
        InputPipeline.from_dict(record["inputs"]),
        {k: [float(t) for t in v] for k, v in record["thresholds"].items()},
        record,
    )


def _clear_pretrained(node: Any) -> Any:
    """``node`` with every ``pretrained`` entry set to ``None`` (a weights file or a download
    the artifact's weights replace)."""
    if isinstance(node, Mapping):
        return {k: None if k == "pretrained" else _clear_pretrained(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_clear_pretrained(v) for v in node]
    return node


def artifact_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The config an artifact is rebuilt from: pretrained weights cleared and the routing
    schedule emptied (the checkpoint's routers are recorded per layer instead)."""
    new = copy.deepcopy(dict(cfg))
    new["model"] = _clear_pretrained(new.get("model"))
    new["routing_schedule"] = []
    return new


def task_record(task: Task) -> dict[str, Any]:
    """What a user of the artifact needs to know of a task: kind, classes (names), whether
    dense, and how outputs become probabilities."""
    if task.kind == "regression":
        output = "values"
    elif task.kind == "multilabel" or task.num_classes == 1:
        output = "sigmoid"
    else:
        output = "softmax over classes"
    return {"kind": task.kind, "num_classes": task.num_classes, **task.options, "output": output}


def layer_record(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every MoE layer's experts and router, as the model holds them."""
    return {
        name: layer_spec(layer.expert_ids, layer.router_config) for name, layer in moe_layers(model)
    }


def measure_cost(model: nn.Module, batch: Batch) -> dict[str, int]:
    """Parameters, active parameters per token and FLOPs (multiply-adds) of one input."""
    records = routing_records(model, batch.inputs)
    return {
        "params": count_parameters(model),
        "active_params": active_parameters(model, records),
        "flops": int(count_flops(model, batch.inputs).total),
    }


def recorded_metrics(run_dir: Path, checkpoint: str, tasks: Sequence[str]) -> dict[str, Any]:
    """The run's metrics of ``tasks`` from its files: ``eval/test-<checkpoint>.json`` (written
    by ``moekit eval``), else the best epoch's validation values in ``summary.json``."""

    def keep(values: Mapping[str, Any]) -> dict[str, Any]:
        return {
            k: v
            for k, v in values.items()
            if len(k.split("/")) == 3
            and k.split("/")[1] in tasks
            and k.split("/")[2] not in METRIC_SKIP
        }

    evaluation = run_dir / "eval" / f"test-{checkpoint}.json"
    if evaluation.is_file():
        values = json.loads(evaluation.read_text()).get("metrics", {})
        return {
            "source": f"Test split, from `{evaluation.name}` (moekit eval).",
            "values": keep(values),
        }
    summary = run_dir / "summary.json"
    if summary.is_file():
        best = json.loads(summary.read_text()).get("best", {})
        values = {k: v for k, v in keep(best.get("metrics") or {}).items() if k.startswith("val/")}
        return {
            "source": f"No test evaluation recorded (`moekit eval {run_dir}` writes one); the "
            f"validation values of the best epoch ({best.get('epoch')}) from `summary.json`.",
            "values": values,
        }
    return {"source": "No metrics recorded with the run.", "values": {}}


def _check_loaded(folder: Path, model: nn.Module, batches: Sequence[Batch]) -> None:
    """The artifact in ``folder``, loaded back, must give ``model``'s outputs exactly."""
    loaded = load_artifact(folder).model
    with torch.no_grad():
        for batch in batches:
            expected, got = run_model(model, batch).preds, run_model(loaded, batch).preds
            for name, value in expected.items():
                if not torch.equal(value, got[name]):
                    difference = float((value - got[name]).abs().max())
                    raise CheckpointError(
                        f"{folder}: the artifact loaded back differs from the model on "
                        f"'{name}' by {difference:.3g}"
                    )


def _extract(
    run_dir: Path,
    task: str,
    checkpoint: str,
    rule: Mapping[str, Any],
    profile_split: str,
    metric_split: str,
    staging: Path,
) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """``(model, config, extraction record)`` of ``task`` extracted as ``moekit prune`` does
    (into ``staging/extraction``, removed afterwards)."""
    extraction = TaskExtraction(run_dir, task, metric_split, profile_split, checkpoint)
    report = extraction.extract(
        rule["threshold"], rule["keep_top"], rule["reduce_k"], staging / "extraction", True
    )
    model, cfg, _ = ckpt_io.load_model(staging / "extraction")
    shutil.rmtree(staging / "extraction")
    keys = ("task", "rule", "threshold", "keep_top", "reduce_k", "profile_split", "max_abs_diff")
    record = {key: report[key] for key in keys}
    record["metric"] = {
        "name": report["metric"],
        "full_model": report["metric_before"],
        "extracted": report["metric_after"],
    }
    return model, cfg, record


def export_run(
    run_dir: str | Path,
    out: str | Path,
    checkpoint: str = "best",
    task: str | None = None,
    threshold: float | None = None,
    keep_top: float | None = None,
    reduce_k: bool = False,
    profile_split: str = "val",
    formats: Sequence[str] = (),
    overwrite: bool = False,
    split: str | None = None,
) -> Path:
    """Write the artifact of ``run_dir``'s ``checkpoint`` (of task ``task`` alone, extracted
    by ``threshold`` or ``keep_top``) to ``out``; see the module docstring.

    ``split`` is the dataset the input pipeline is read from (default: the first of test, val,
    train); ``formats`` lists programs to write as well (:data:`~moekit.inference.program.
    FORMATS`). An existing ``out`` is replaced only with ``overwrite``, and never when it is
    (or holds) the run.
    """
    from moekit.analysis.extraction import check_rule

    run_dir, out = Path(run_dir), Path(out)
    for fmt in formats:
        if fmt not in FORMATS:
            raise ConfigError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if task is None and (threshold is not None or keep_top is not None or reduce_k):
        raise ConfigError("--threshold, --keep-top and --reduce-k extract a task: give --task")
    if task is not None:
        check_rule(threshold, keep_top)
    claim_output(out, run_dir, overwrite)
    source = ckpt_io.checkpoint_dir(run_dir, checkpoint)
    model, cfg, tasks = ckpt_io.load_model(run_dir, checkpoint)
    pipeline, dataset = pipeline_from_config(cfg, split)
    thresholds = decision_thresholds(cfg, tasks, source)
    staging = out.with_name(f".{out.name}.tmp")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        extraction = None
        if task is not None:
            check_task(list(tasks), task, run_dir)
            rule = {"threshold": threshold, "keep_top": keep_top, "reduce_k": reduce_k}
            metric_split = "test" if cfg.get("data", {}).get("test") is not None else profile_split
            model, cfg, extraction = _extract(
                run_dir, task, checkpoint, rule, profile_split, metric_split, staging
            )
            tasks = tasks_from_config(cfg)
            thresholds = {k: v for k, v in thresholds.items() if k == task}
        batches = [collate_samples([dataset[i]]) for i in range(min(CHECK_INPUTS, len(dataset)))]
        batches = [Batch(b.inputs, {}, {}, {}, b.present) for b in batches]
        state = ckpt_io.read_state(source)
        record = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "moekit_version": moekit.__version__,
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            "source": {
                "run": str(run_dir.resolve()),
                "checkpoint": checkpoint,
                "epoch": state.get("epoch"),
            },
            "tasks": {name: task_record(t) for name, t in tasks.items()},
            "thresholds": thresholds,
            "inputs": pipeline.as_dict(),
            "layers": layer_record(model),
            "cost": measure_cost(model, batches[0]),
            "metrics": recorded_metrics(run_dir, checkpoint, list(tasks)),
            "extraction": extraction,
            "programs": {},
        }
        save_model(model, str(staging / WEIGHTS_FILE))
        saved_cfg = artifact_config(cfg)
        config_io.save(saved_cfg, staging / CONFIG_FILE)
        for fmt in formats:
            export_program(model, tasks, batches, fmt, staging / FORMATS[fmt])
            record["programs"][fmt] = FORMATS[fmt]
        atomic_write_text(staging / RECORD_FILE, json.dumps(json_safe(record), indent=2) + "\n")
        atomic_write_text(staging / CARD_FILE, model_card(record, saved_cfg))
        _check_loaded(staging, model, batches)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    out.parent.mkdir(parents=True, exist_ok=True)
    return replace_dir(staging, out)
