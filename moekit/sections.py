"""The sections of an experiment config: every key moekit reads, its default and its check.

The top level and the engine's sections (``train``, ``data``, ``eval``, ``debug``,
``finetune``) are :class:`~moekit.schema.Section` s; the component sections (``model``,
``optimizer``, ``scheduler``, ``weighting``, ``preprocess``, the datasets, ``aux_losses``) name
a registry entry whose arguments :mod:`moekit.engine.config_check` checks against its
signature. A key listed here with a default can be set with ``--set key=value`` even where the
config file does not write it. docs/training.md documents every key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from moekit.errors import ConfigError
from moekit.schema import (
    Field,
    Section,
    boolean,
    choice,
    component,
    component_of,
    integer,
    list_of,
    mapping,
    number,
    optional,
    string,
)

MIXED_PRECISION = ("no", "fp16", "bf16")


def regex(value: Any, key: str) -> str:
    """A regular expression (matched against whole names)."""
    string(value, key)
    try:
        re.compile(value)
    except re.error as exc:
        raise ConfigError(f"config key '{key}': '{value}' is not a valid regex ({exc})") from None
    return value


STAGE = {
    "epochs": Field(None, integer(1), "epochs of the stage", required=True),
    "trainable": Field("all", regex, "head (all but the backbone), all, or a regex"),
    "optimizer": Field(None, optional(mapping), "merged over the optimizer section"),
    "scheduler": Field(None, optional(mapping), "merged over the scheduler section"),
}
"""The keys of one ``train.stages`` entry (:mod:`moekit.engine.stages`)."""


def stages_check(value: Any, key: str) -> list[dict[str, Any]]:
    """A list of stages, each ``{epochs, trainable, optimizer, scheduler}`` (:data:`STAGE`)."""
    stages = list_of(mapping)(value, key)
    return [Section(f"{key}[{i}]", STAGE).parse(stage) for i, stage in enumerate(stages)]


TRAIN = Section(
    "train",
    {
        "epochs": Field(1, optional(integer(1)), "epochs to train (with stages: their sum)"),
        "grad_accum": Field(1, integer(1), "batches whose gradients add up to one step"),
        "clip_grad": Field(None, optional(number(0.0)), "max global gradient norm (null: off)"),
        "mixed_precision": Field("no", choice(*MIXED_PRECISION), "autocast precision"),
        "device": Field("auto", choice("auto", "cpu"), "auto: the accelerator if any"),
        "num_threads": Field(
            None, optional(integer(1)), "intra-op CPU threads per process (null: see docs)"
        ),
        "find_unused_parameters": Field(True, boolean, "DDP's unused-parameter search"),
        "freeze": Field([], list_of(string, scalar=True), "regexes of frozen parameters"),
        "log_every": Field(10, integer(1), "steps between loss lines in train.log"),
        "log_with": Field(None, optional(choice("tensorboard")), "experiment tracker"),
        "save_best": Field(True, boolean, "keep checkpoints/best by eval.monitor"),
        "curves": Field(True, boolean, "draw training curves at the end"),
        "stages": Field([], stages_check, "staged fine-tuning: the stages' epochs add up"),
    },
    "the training loop",
)
DATA = Section(
    "data",
    {
        "train": Field(None, component, "the training dataset"),
        "val": Field(None, component, "the validation dataset"),
        "test": Field(None, component, "the test dataset"),
        "batch_size": Field(8, integer(1), "samples per batch and process"),
        "eval_batch_size": Field(None, optional(integer(1)), "batch size of evaluation"),
        "num_workers": Field(0, integer(0), "loader worker processes"),
        "drop_last": Field(False, boolean, "drop the last incomplete training batch"),
        "pin_memory": Field(None, optional(boolean), "null: on when CUDA is available"),
        "sampler": Field(None, component, "random (default) or balanced_source"),
    },
    "datasets and loaders",
)
EVAL = Section(
    "eval",
    {
        "monitor": Field(None, optional(string), "split/column selecting checkpoints/best"),
        "mode": Field(None, optional(choice("min", "max")), "min or max (null: inferred)"),
        "mtl_delta": Field(None, optional(mapping), "multi-task delta options"),
        "threshold": Field(
            0.5, number(0.0, 1.0, below_maximum=True), "probability threshold of masks"
        ),
        "thresholds": Field(
            None, optional(choice("tune")), "tune: per-class thresholds tuned on val, kept for test"
        ),
    },
    "evaluation",
)
DEBUG = Section(
    "debug",
    {
        "inject_nan_at_step": Field(None, optional(integer(1)), "make a loss NaN at this step"),
        "nan_task": Field(None, optional(string), "the task whose loss is made NaN"),
        "stop_after_epoch": Field(None, optional(integer(1)), "stop as if interrupted"),
    },
    "test hooks",
)


def weights_check(value: Any, key: str) -> str | dict[str, str]:
    """``finetune.weights``: a regex, or a mapping ``{regex: name template}``."""
    if isinstance(value, Mapping):
        return {regex(k, f"{key}.{k}"): string(v, f"{key}.{k}") for k, v in value.items()}
    return regex(value, key)


FINETUNE = Section(
    "finetune",
    {
        "init": Field(None, optional(string), "the run to start from"),
        "checkpoint": Field("best", choice("best", "last"), "checkpoint of the init run"),
        "mode": Field("all", choice("all", "heads", "routers"), "what is trained"),
        "tasks": Field(None, optional(list_of(string)), "tasks to fine-tune"),
        "weights": Field(None, optional(weights_check), "regex or {regex: init name} (null: all)"),
    },
    "start from another run's weights",
)


def finetune_check(value: Any, key: str) -> dict[str, Any] | None:
    """``finetune: MODE`` or a mapping of the finetune section."""
    if value is None:
        return None
    return FINETUNE.parse({"mode": value} if isinstance(value, str) else value)


def phases_check(value: Any, key: str) -> list[Any]:
    """A phase list (checked in full by :func:`moekit.engine.schedule.parse_phases`)."""
    return list_of(mapping)(value, key)


ROOT = Section(
    "",
    {
        "name": Field("run", string, "the run's name (run directory prefix)"),
        "seed": Field(0, integer(0), "the random seed of everything"),
        "deterministic": Field(
            "auto",
            choice("auto", True, False, "warn"),
            "deterministic kernels; auto: on a CPU, not on an accelerator (docs/training.md)",
        ),
        "output_dir": Field("runs", string, "where auto-named run directories go"),
        "imports": Field([], list_of(string), "modules imported before anything is built"),
        "tasks": Field(None, mapping, "task name -> spec", required=True),
        "model": Field(None, component, "the model ({type: ...})"),
        "data": DATA,
        "train": TRAIN,
        "optimizer": Field(
            {"type": "adamw"}, component_of("adamw"), "OPTIMIZERS entry + param_groups"
        ),
        "scheduler": Field(
            {"type": "constant"}, component_of("constant"), "LR_SCHEDULERS entry + warmup"
        ),
        "eval": EVAL,
        "weighting": Field(None, component, "task weighting (default equal)"),
        "aux_losses": Field([], list_of(component), "routing losses"),
        "routing_schedule": Field([], phases_check, "router of each phase"),
        "freeze_schedule": Field([], phases_check, "frozen parameters of each phase"),
        "finetune": Field(None, finetune_check, "start from another run"),
        "debug": DEBUG,
        "preprocess": Field(None, component, "PREPROCESS step applied to every image"),
    },
    "an experiment",
)


def settings(cfg: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The checked section ``name`` of ``cfg`` with its defaults filled in.

    With ``train.stages``, ``train.epochs`` is the sum of the stages' epochs (``null`` or left
    out; a different value is an error); without, ``null`` is an error."""
    spec = ROOT.fields[name]
    if not isinstance(spec, Section):
        raise KeyError(f"'{name}' is not a section")
    parsed = spec.parse(cfg.get(name))
    if name == "train":
        written = (cfg.get("train") or {}).get("epochs", None)
        total = sum(stage["epochs"] for stage in parsed["stages"])
        if not parsed["stages"] and parsed["epochs"] is None:
            raise ConfigError(
                "config key 'train.epochs': expected an integer >= 1 (null only with train.stages)"
            )
        if parsed["stages"] and written is not None and written != total:
            raise ConfigError(
                f"config key 'train.epochs': {written}, but train.stages add up to {total} "
                "epochs; set it to null or leave it out"
            )
        if parsed["stages"]:
            parsed["epochs"] = total
    return parsed


def value(cfg: Mapping[str, Any], name: str) -> Any:
    """The checked top-level key ``name`` of ``cfg`` (its default where absent)."""
    spec = ROOT.fields[name]
    if isinstance(spec, Section):
        return spec.parse(cfg.get(name))
    if name in cfg:
        return spec.check(cfg[name], name)
    return spec.default


def check(cfg: Mapping[str, Any]) -> None:
    """Check every top-level key and every engine section of ``cfg``."""
    ROOT.parse(cfg)


def documented(key: str) -> bool:
    """Whether a dotted key is one moekit documents (so ``--set`` may add it without ``+``)."""
    found = ROOT.find(key.split("."))
    return found is not None and not isinstance(found, Section)
