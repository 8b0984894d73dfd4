"""Optimizers with parameter groups, learning-rate schedules with warmup, and freezing.

Parameter groups and freezing select parameters by name with regular expressions that must
match the *whole* name (``re.fullmatch``), e.g. ``backbone\\..*``. Names are the model's
parameter names; parameters of the task weighting are named ``weighting.<name>``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from moekit.engine.settings import OPTIMIZER, SCHEDULER, section
from moekit.errors import ConfigError, did_you_mean

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "cosine", "step")


def named_parameters(
    model: nn.Module, weighting: nn.Module | None = None
) -> list[tuple[str, nn.Parameter]]:
    """The trainable tensors of an experiment with the names patterns match against."""
    named = list(model.named_parameters())
    if weighting is not None:
        named += [(f"weighting.{n}", p) for n, p in weighting.named_parameters()]
    return named


def _compile(pattern: Any, key: str) -> re.Pattern[str]:
    try:
        return re.compile(str(pattern))
    except re.error as exc:
        raise ConfigError(f"config key '{key}': '{pattern}' is not a valid regex ({exc})") from None


def param_groups(
    named: Sequence[tuple[str, nn.Parameter]], groups: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Split parameters into the configured groups; the rest form the group ``default``.

    Parameters of the task weighting not claimed by a group form the group ``weighting``
    without weight decay (decaying learned log-variances would bias them towards 0).

    A parameter belongs to the first group whose ``params`` regex matches its whole name. Each
    group may set ``lr``, ``weight_decay`` (and any other optimizer option) and a ``name``.
    A group that matches no parameter is an error (a typo would otherwise go unnoticed).
    """
    taken: set[str] = set()
    result = []
    for i, group in enumerate(groups):
        key = f"optimizer.param_groups[{i}]"
        if not isinstance(group, Mapping) or "params" not in group:
            raise ConfigError(f"config key '{key}': expected a mapping with 'params' (a regex)")
        regex = _compile(group["params"], f"{key}.params")
        params = [(n, p) for n, p in named if n not in taken and regex.fullmatch(n)]
        if not params:
            raise ConfigError(
                f"config key '{key}.params': '{group['params']}' matches no parameter"
                f"{did_you_mean(str(group['params']), [n for n, _ in named])}"
            )
        taken.update(n for n, _ in params)
        options = {k: v for k, v in group.items() if k not in ("params", "name")}
        result.append(
            {"params": [p for _, p in params], "name": group.get("name", f"group{i}"), **options}
        )
    rest = [p for n, p in named if n not in taken and not n.startswith("weighting.")]
    if rest:
        result.append({"params": rest, "name": "default"})
    weighting = [p for n, p in named if n not in taken and n.startswith("weighting.")]
    if weighting:
        result.append({"params": weighting, "name": "weighting", "weight_decay": 0.0})
    return result


def build_optimizer(named: Sequence[tuple[str, nn.Parameter]], cfg: Mapping[str, Any]) -> Optimizer:
    """AdamW, Adam or SGD over the parameter groups of the ``optimizer`` config section."""
    opt = section(cfg, "optimizer", OPTIMIZER)
    kind = opt["type"]
    groups = param_groups(named, opt["param_groups"])
    lr, wd = float(opt["lr"]), float(opt["weight_decay"])
    if kind in ("adamw", "adam"):
        cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
        return cls(groups, lr=lr, weight_decay=wd, betas=tuple(opt["betas"]), eps=float(opt["eps"]))
    if kind == "sgd":
        return torch.optim.SGD(
            groups,
            lr=lr,
            weight_decay=wd,
            momentum=float(opt["momentum"]),
            nesterov=bool(opt["nesterov"]),
        )
    raise ConfigError(
        f"config key 'optimizer.type': '{kind}' is not one of {', '.join(OPTIMIZERS)}"
        f"{did_you_mean(str(kind), OPTIMIZERS)}"
    )


def lr_factor(
    kind: str,
    total_steps: int,
    steps_per_epoch: int,
    warmup: int,
    min_lr_ratio: float,
    step_size: float,
    gamma: float,
) -> Callable[[int], float]:
    """The factor of the base learning rates after ``step`` optimizer steps.

    Linear warmup from ``1 / warmup`` to 1 over ``warmup`` steps, then ``constant`` (1),
    ``cosine`` (``r + (1 - r) · ½ (1 + cos(π t))`` over the remaining steps, ``r`` the
    ``min_lr_ratio``) or ``step`` (``γ^⌊epoch / step_size⌋``). A plain function of the step:
    a checkpoint saves only the step count, so a resumed run follows its current config.
    """

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "cosine":
            t = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
            return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
        if kind == "step":
            return gamma ** math.floor(step / steps_per_epoch / step_size)
        return 1.0

    return factor


def build_scheduler(
    optimizer: Optimizer, cfg: Mapping[str, Any], steps_per_epoch: int, epochs: int
) -> LambdaLR:
    """The ``scheduler`` config section as a per-optimizer-step ``LambdaLR``."""
    sched = section(cfg, "scheduler", SCHEDULER)
    kind = sched["type"]
    if kind not in SCHEDULES:
        raise ConfigError(
            f"config key 'scheduler.type': '{kind}' is not one of {', '.join(SCHEDULES)}"
            f"{did_you_mean(str(kind), SCHEDULES)}"
        )
    warmup = sched["warmup_steps"]
    if warmup is None:
        warmup = round(float(sched["warmup_epochs"]) * steps_per_epoch)
    if float(sched["step_size"]) <= 0:
        raise ConfigError("config key 'scheduler.step_size': expected a positive number of epochs")
    factor = lr_factor(
        kind,
        steps_per_epoch * epochs,
        steps_per_epoch,
        int(warmup),
        float(sched["min_lr_ratio"]),
        float(sched["step_size"]),
        float(sched["gamma"]),
    )
    return LambdaLR(optimizer, factor)


def set_frozen(named: Iterable[tuple[str, nn.Parameter]], patterns: Sequence[str], key: str) -> int:
    """Freeze the parameters whose name matches a pattern, unfreeze the others.

    Sets ``requires_grad`` on *parameters* (freezing a module's flag would freeze nothing).
    Returns how many parameters are frozen; a pattern that matches nothing is an error.
    """
    named = list(named)
    regexes = [_compile(p, key) for p in patterns]
    for pattern, regex in zip(patterns, regexes):
        if not any(regex.fullmatch(n) for n, _ in named):
            raise ConfigError(
                f"config key '{key}': '{pattern}' matches no parameter"
                f"{did_you_mean(str(pattern), [n for n, _ in named])}"
            )
    frozen = 0
    for name, param in named:
        freeze = any(r.fullmatch(name) for r in regexes)
        param.requires_grad_(not freeze)
        frozen += freeze
    return frozen
