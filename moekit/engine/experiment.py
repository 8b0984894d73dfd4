"""``build_experiment(cfg)``: every object of an experiment, built from the registries.

The trainer owns no model-specific code: tasks come from ``tasks:``, datasets from ``DATASETS``,
the model from ``MODELS``, losses from ``TASK_LOSSES``, the weighting from ``WEIGHTINGS``,
routing losses from ``AUX_LOSSES``; the optimizer, LR schedule and phase schedules from their
config sections, and what ``finetune`` freezes (docs/training.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader, Dataset

from moekit.engine import finetune
from moekit.engine.launch import uses_cpu
from moekit.engine.objective import AuxTerm, MultiTaskObjective
from moekit.engine.optim import build_optimizer, build_scheduler, named_parameters
from moekit.engine.schedule import Phase, parse_phases
from moekit.engine.seeding import seed_everything
from moekit.errors import ConfigError
from moekit.losses.task_losses import resolve_auto_counts
from moekit.registry import (
    AUX_LOSSES,
    DATASETS,
    METRICS,
    MODELS,
    TASK_LOSSES,
    WEIGHTINGS,
    accepted_kwargs,
    import_user_modules,
)
from moekit.schema import OBJECT_KEY, is_object_entry
from moekit.sections import settings, value
from moekit.types import Task, tasks_from_config

SPLITS = ("train", "val", "test")


@dataclass
class Experiment:
    """The built parts of an experiment (``optimizer``/``scheduler`` only with a train split)."""

    cfg: dict[str, Any]
    tasks: dict[str, Task]
    datasets: dict[str, Dataset | DataLoader]
    model: nn.Module
    objective: MultiTaskObjective
    optimizer: Optimizer | None
    scheduler: LRScheduler | None
    steps_per_epoch: int
    routing_schedule: list[Phase]
    freeze_schedule: list[Phase]
    mtl_delta: Any | None

    @property
    def data(self) -> dict[str, Any]:
        return settings(self.cfg, "data")


def build_aux_terms(raw: Any) -> list[AuxTerm]:
    """``aux_losses: [{type, weight, name?, **options}]`` as weighted routing-loss terms."""
    if raw in (None, []):
        return []
    if not isinstance(raw, list):
        raise ConfigError(f"config key 'aux_losses': expected a list, got {raw!r}")
    terms = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, Mapping) or "type" not in entry:
            raise ConfigError(f"config key 'aux_losses[{i}]': expected a mapping with 'type'")
        spec = dict(entry)
        weight = float(spec.pop("weight", 1.0))
        name = str(spec.pop("name", spec["type"]))
        if name in {t.name for t in terms}:
            raise ConfigError(
                f"config key 'aux_losses[{i}]': a second loss named '{name}' (set name:)"
            )
        terms.append(AuxTerm(name, weight, AUX_LOSSES.build(spec)))
    return terms


def build_task_losses(
    tasks: Mapping[str, Task], train: Callable[[], Any] | None = None
) -> dict[str, list[tuple[float, nn.Module]]]:
    """Every task's weighted ``TASK_LOSSES`` terms. ``train`` returns the training dataset,
    asked only for ``counts: auto`` (:func:`~moekit.losses.task_losses.resolve_auto_counts`)."""
    losses = {}
    for name, task in tasks.items():
        if not task.loss:
            raise ConfigError(f"config key 'tasks.{name}.loss': a task needs at least one loss")
        losses[name] = [
            (term.weight, TASK_LOSSES.build(resolve_auto_counts(term.config(), name, train)))
            for term in task.loss
        ]
    return losses


def built_object(cfg_value: Any, given: Any, key: str) -> Any:
    """The object passed for a config entry that records one (``Trainer(model=...)``), or None
    when the entry is a config to build from."""
    if given is not None:
        return given
    if is_object_entry(cfg_value):
        raise ConfigError(
            f"config key '{key}': the run was given a Python object "
            f"({cfg_value[OBJECT_KEY]}) that the config cannot rebuild; pass it again "
            f"(e.g. load_run(run, {key.split('.')[-1]}=...) or Trainer({key.split('.')[-1]}=...))"
        )
    return None


def build_dataset(cfg: Mapping[str, Any], split: str, given: Any = None) -> Any:
    """The ``data.<split>`` dataset (or the dataset or loader object ``given`` for it). One
    that takes a ``seed`` (augmentation, validation split, generated samples) and is given none
    gets the config's top-level ``seed``; one that takes a ``preprocess`` step gets the
    config's top-level ``preprocess`` (the same for every split, and for ``moekit predict``)."""
    spec = settings(cfg, "data")[split]
    built = built_object(spec, given, f"data.{split}")
    if built is not None:
        return built
    if spec is None:
        raise ConfigError(f"config key 'data.{split}': the config defines no {split} dataset")
    accepted, _ = accepted_kwargs(DATASETS.get(spec["type"]))
    defaults: dict[str, Any] = {}
    if "seed" in accepted and "seed" not in spec:
        defaults["seed"] = int(cfg.get("seed", 0))
    preprocess = value(cfg, "preprocess")
    if preprocess is not None and "preprocess" in accepted and "preprocess" not in spec:
        defaults["preprocess"] = preprocess
    return DATASETS.build(spec, **defaults)


def build_model(cfg: Mapping[str, Any], tasks: Mapping[str, Task] | None = None) -> nn.Module:
    """The config's model (``MODELS``) for its tasks (or ``tasks``), untrained."""
    tasks = tasks_from_config(cfg) if tasks is None else tasks
    if cfg.get("model") is None:
        raise ConfigError("config key 'model': the config defines no model")
    return MODELS.build(value(cfg, "model"), tasks=tasks)


def steps_per_epoch(train: Any, data: Mapping[str, Any], num_processes: int, accum: int) -> int:
    """Optimizer steps per epoch of the training dataset (or loader) over ``num_processes``."""
    if isinstance(train, DataLoader):  # a given loader: its batches, sharded over processes
        return math.ceil(math.ceil(len(train) / num_processes) / accum)
    num_samples = len(train)
    global_batch = int(data["batch_size"]) * num_processes
    batches = (
        num_samples // global_batch if data["drop_last"] else math.ceil(num_samples / global_batch)
    )
    if batches < 1:
        raise ConfigError(
            f"config key 'data.batch_size': {num_samples} training samples make no batch of "
            f"{global_batch} (batch_size x processes) with drop_last"
        )
    return math.ceil(batches / accum)


def build_experiment(
    cfg: Mapping[str, Any],
    num_processes: int = 1,
    splits: Iterable[str] | None = None,
    objects: Mapping[str, Any] | None = None,
) -> Experiment:
    """Seed everything, then build tasks, datasets, model, objective, optimizer and schedules.

    Args:
        cfg: the resolved config.
        num_processes: data-parallel processes (sets the optimizer steps per epoch).
        splits: the datasets to build (default: every split the config defines). Without
            ``train`` no optimizer or scheduler is built.
        objects: built objects standing for config entries (``model``, ``train``, ``val``,
            ``test``: a module, a dataset or a loader), as ``Trainer(model=...)`` passes them.
    """
    import_user_modules(cfg)
    objects = dict(objects or {})
    cfg = dict(cfg)
    seed_everything(int(cfg.get("seed", 0)), value(cfg, "deterministic"), uses_cpu(cfg))
    train = settings(cfg, "train")
    data = settings(cfg, "data")
    evaluation = settings(cfg, "eval")
    debug = settings(cfg, "debug")
    tasks = tasks_from_config(cfg)
    if debug["nan_task"] is not None and debug["nan_task"] not in tasks:
        raise ConfigError(f"config key 'debug.nan_task': no task named '{debug['nan_task']}'")
    model = built_object(cfg.get("model"), objects.get("model"), "model")
    model = build_model(cfg, tasks) if model is None else model
    weighting = WEIGHTINGS.build(cfg.get("weighting") or {"type": "equal"}, tasks=tasks)
    wanted = [s for s in SPLITS if data[s] is not None] if splits is None else list(splits)
    datasets = {split: build_dataset(cfg, split, objects.get(split)) for split in wanted}

    def train_dataset() -> Any:
        if "train" in datasets:
            return datasets["train"]
        return build_dataset(cfg, "train", objects.get("train"))

    losses = build_task_losses(tasks, train_dataset)
    objective = MultiTaskObjective(
        model, tasks, losses, weighting, build_aux_terms(cfg.get("aux_losses"))
    )
    optimizer = scheduler = None
    per_epoch = 0
    if "train" in datasets:
        per_epoch = steps_per_epoch(datasets["train"], data, num_processes, train["grad_accum"])
        optimizer = build_optimizer(named_parameters(model, weighting), cfg)
        scheduler = build_scheduler(optimizer, cfg, per_epoch, train["epochs"])
    finetune.freeze(model, list(tasks), cfg, optimizer)
    delta = evaluation["mtl_delta"]
    return Experiment(
        cfg=cfg,
        tasks=tasks,
        datasets=datasets,
        model=model,
        objective=objective,
        optimizer=optimizer,
        scheduler=scheduler,
        steps_per_epoch=per_epoch,
        routing_schedule=parse_phases(cfg.get("routing_schedule"), "routing_schedule"),
        freeze_schedule=parse_phases(cfg.get("freeze_schedule"), "freeze_schedule"),
        mtl_delta=None if delta is None else METRICS.build({"type": "mtl_delta", **delta}),
    )
