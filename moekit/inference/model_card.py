"""``model_card.md`` of an exported artifact: what the model is, what it was trained on, how it
scored, what it costs and how to run it, from the artifact's ``artifact.json`` record."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moekit import config as config_io
from moekit.analysis.flops import UNIT


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return lines


def _decision(task: Mapping[str, Any], thresholds: list[float] | None) -> str:
    if task["kind"] == "multiclass":
        return "the most probable class"
    if task["kind"] == "multilabel":
        return "class c positive when p_c > " + ", ".join(f"{t:g}" for t in thresholds or [])
    if task["kind"] == "segmentation":
        if task["num_classes"] == 1:
            return f"mask p > {(thresholds or [0.5])[0]:g}"
        return "the most probable class per pixel"
    return "the predicted value" + (" per pixel" if task.get("dense") else "")


def _value(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def model_card(record: Mapping[str, Any], cfg: Mapping[str, Any]) -> str:
    """The model card's markdown."""
    source = record["source"]
    extraction = record.get("extraction")
    title = cfg.get("name", "model")
    lines = [
        f"# {title}",
        "",
        f"A moekit {record['moekit_version']} model artifact, exported from the run "
        f"`{source['run']}` (checkpoint `{source['checkpoint']}`, epoch {source.get('epoch')}) "
        f"on {record['created']}.",
        "",
        "## Model",
        "",
    ]
    model = cfg.get("model") or {}
    if extraction:
        inner = model.get("model", {})
        lines.append(
            f"The subnetwork of task `{extraction['task']}` extracted from a `{inner.get('type')}` "
            f"model by expert usage on its `{extraction['profile_split']}` split (Mod-Squad, "
            f"Chen et al., CVPR 2023, §3.5), rule `{extraction['rule']}`; its outputs differ "
            f"from the full model's for that task by at most {extraction['max_abs_diff']:.3g} "
            "there."
        )

    else:
        lines.append(f"`{model.get('type')}`, all tasks.")
    cost = record["cost"]
    lines += [
        "",
        f"- parameters: {cost['params']:,}",
        f"- active parameters per token: {cost['active_params']:,}",
        f"- FLOPs per input: {cost['flops']:,} {UNIT}, measured at export on one input of "
        "the run's data",
    ]
    if extraction:
        metric = extraction["metric"]
        lines.append(
            f"- `{metric['name']}`: {_value(metric['extracted'])} (the full model: "
            f"{_value(metric['full_model'])}), measured at export"
        )
    for name, spec in record.get("layers", {}).items():
        router = ", ".join(f"{k}={v}" for k, v in spec["router"].items())
        lines.append(f"- MoE layer `{name}`: experts {spec['experts']}, router {router}")
    lines += ["", "## Inputs", ""]
    rows = []
    for spec in record["inputs"]["modalities"]:
        normalise = (
            f"mean {spec['mean']}, std {spec['std']}" if spec["mean"] is not None else "v / 255"
        )
        size = f"{spec['size'][0]}×{spec['size'][1]}"
        rows.append(
            [spec["name"], spec["kind"], spec["channels"], size, spec["preprocess"], normalise]
        )
    lines += _table(
        ["modality", "kind", "channels", "height×width", "preprocessing", "normalisation"], rows
    )
    lines += ["", "## Tasks", ""]
    rows = []
    for name, task in record["tasks"].items():
        classes = ", ".join(task.get("class_names") or []) or task["num_classes"]
        rows.append([name, task["kind"], classes, _decision(task, record["thresholds"].get(name))])
    lines += _table(["task", "kind", "classes", "decision"], rows)
    lines += ["", "## Training data", ""]
    data = cfg.get("data") or {}
    for split in ("train", "val", "test"):
        if data.get(split) is not None:
            lines.append(f"- {split}: `{config_io.dump_value(data[split]).strip()}`")
    train = cfg.get("train") or {}
    lines.append(f"- epochs: {train.get('epochs')}, seed: {cfg.get('seed', 0)}")
    metrics = record["metrics"]
    lines += ["", "## Metrics", "", metrics["source"], ""]
    if metrics["values"]:
        lines += _table(["metric", "value"], [[k, _value(v)] for k, v in metrics["values"].items()])
    lines += [
        "",
        "## Use",
        "",
        "```bash",
        "moekit predict ARTIFACT_DIR photo.jpg more_photos/ --out predictions/",
        "```",
        "",
        "```python",
        "import moekit",
        "",
        'artifact = moekit.load_artifact("ARTIFACT_DIR")',
        'prediction = artifact.predictor().predict_file("photo.jpg")',
        "```",
        "",
    ]
    programs = record.get("programs") or {}
    if programs:
        lines += ["Programs that run without moekit (one input, per-task probabilities):", ""]
        lines += [f"- `{file}` ({fmt})" for fmt, file in programs.items()]
        lines.append("")
    return "\n".join(lines)
