"""Staged fine-tuning (``train.stages``): consecutive stages, each with what trains and its own
optimizer and learning-rate schedule.

Transfer learning trains a new head on a frozen pretrained backbone first, then fine-tunes
everything with a small learning rate (the ODIR study: Adam 1e-3 on the head, then Adam 2e-5 on
all parameters)::

    train:
      stages:
        - {epochs: 5, trainable: head, optimizer: {lr: 1.0e-3}}
        - {epochs: 5, trainable: all, optimizer: {lr: 2.0e-5}, scheduler: {type: cosine}}

- ``epochs``: the stage's length; ``train.epochs`` is the sum over the stages.
- ``trainable``: ``head`` — every parameter outside the model's ``backbone`` module —, ``all``,
  or a regex that must match the whole name of each parameter that trains (``re.fullmatch``,
  as ``train.freeze``). ``train.freeze`` and ``freeze_schedule`` still apply on top. A frozen
  batch-norm layer normalises with its running statistics and never updates them
  (:func:`moekit.engine.finetune.keep_frozen_batchnorm_in_eval`).
- ``optimizer`` / ``scheduler``: merged over the config's ``optimizer`` / ``scheduler``
  sections (a different ``type`` replaces the section instead). Each stage starts a fresh
  optimizer (no moments carried over) over every parameter — frozen ones get no gradient and
  are not updated — and a fresh schedule over the stage's own steps (warmup included).

The best checkpoint is selected over every epoch of every stage (``eval.monitor``), so a run
whose fine-tuning stage never beats its head-only stage keeps the head-only weights. A run
resumed inside a stage rebuilds that stage's optimizer and schedule and loads their states.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from moekit.config import deep_merge
from moekit.engine.optim import build_optimizer, build_scheduler
from moekit.errors import ConfigError, did_you_mean
from moekit.sections import settings, value

BACKBONE_PREFIX = "backbone."
"""``trainable: head`` trains every parameter whose name does not start with this."""


@dataclass(frozen=True)
class Stage:
    """One stage: its index, its first epoch (0-based) and its settings."""

    index: int
    start: int
    epochs: int
    trainable: str
    optimizer: dict[str, Any] | None
    scheduler: dict[str, Any] | None

    @property
    def key(self) -> str:
        return f"train.stages[{self.index}]"

    def describe(self, total: int) -> str:
        return (
            f"stage {self.index + 1}/{total} (epochs {self.start + 1}-{self.start + self.epochs})"
            f": trainable {self.trainable}"
        )


def parse_stages(cfg: Mapping[str, Any]) -> list[Stage]:
    """The config's stages (none without ``train.stages``)."""
    stages, start = [], 0
    for index, raw in enumerate(settings(cfg, "train")["stages"]):
        stages.append(
            Stage(
                index,
                start,
                raw["epochs"],
                raw["trainable"],
                raw["optimizer"],
                raw["scheduler"],
            )
        )
        start += raw["epochs"]
    return stages


def stage_of(stages: Sequence[Stage], epoch: int) -> Stage | None:
    """The stage 0-based ``epoch`` belongs to (the last one past the end; None without
    stages)."""
    if not stages:
        return None
    for stage in stages:
        if epoch < stage.start + stage.epochs:
            return stage
    return stages[-1]


def trainable_names(stage: Stage, names: Sequence[str]) -> set[str]:
    """The parameter names the stage trains; a ``trainable`` that selects nothing (or a model
    without a ``backbone`` for ``head``) is a :class:`ConfigError`."""
    where = f"config key '{stage.key}.trainable'"
    if stage.trainable == "all":
        return set(names)
    if stage.trainable == "head":
        if not any(n.startswith(BACKBONE_PREFIX) for n in names):
            raise ConfigError(
                f"{where}: 'head' trains all but the model's 'backbone', and this model has "
                "no parameter 'backbone.*'; name the parameters to train with a regex"
            )
        chosen = {n for n in names if not n.startswith(BACKBONE_PREFIX)}
    else:
        regex = re.compile(stage.trainable)  # checked by moekit.sections
        chosen = {n for n in names if regex.fullmatch(n)}
    if not chosen:
        raise ConfigError(
            f"{where}: '{stage.trainable}' matches no parameter"
            f"{did_you_mean(stage.trainable, list(names))}"
        )
    return chosen


def freeze_outside(stage: Stage | None, named: Sequence[tuple[str, nn.Parameter]]) -> int:
    """Freeze the parameters ``stage`` does not train (after ``train.freeze`` has set the
    others); returns how many it froze."""
    if stage is None:
        return 0
    chosen = trainable_names(stage, [n for n, _ in named])
    frozen = 0
    for name, param in named:
        if name not in chosen and param.requires_grad:
            param.requires_grad_(False)
            frozen += 1
    return frozen


def _merged(cfg: Mapping[str, Any], section: str, given: Mapping[str, Any] | None) -> Any:
    base = value(cfg, section)
    if not given:
        return base
    if "type" in given and given["type"] != base.get("type"):
        return dict(given)
    return deep_merge(base, given)


def stage_config(cfg: Mapping[str, Any], stage: Stage) -> dict[str, Any]:
    """``cfg`` with the stage's optimizer and scheduler merged over its sections."""
    return {
        **cfg,
        "optimizer": _merged(cfg, "optimizer", stage.optimizer),
        "scheduler": _merged(cfg, "scheduler", stage.scheduler),
    }


def build_stage_optimizer(
    named: Sequence[tuple[str, nn.Parameter]],
    cfg: Mapping[str, Any],
    stage: Stage,
    steps_per_epoch: int,
) -> tuple[Optimizer, LambdaLR]:
    """A fresh optimizer over every parameter and a schedule over the stage's steps."""
    staged = stage_config(cfg, stage)
    try:
        optimizer = build_optimizer(named, staged)
        scheduler = build_scheduler(optimizer, staged, steps_per_epoch, stage.epochs)
    except ConfigError as exc:
        raise ConfigError(f"{stage.key}: {exc}") from None
    return optimizer, scheduler
