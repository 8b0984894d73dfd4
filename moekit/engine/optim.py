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

from moekit.errors import ConfigError, did_you_mean
from moekit.registry import LR_SCHEDULERS, OPTIMIZERS
from moekit.schema import fail, integer, number
from moekit.sections import value


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
        check_rates(options, key)
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


def check_rates(options: Mapping[str, Any], key: str) -> None:
    """``lr`` > 0 and ``weight_decay`` >= 0 where given (torch's own checks raise a bare
    ``ValueError`` deep inside the optimizer)."""
    lr = options.get("lr")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, int | float) or lr <= 0):
        fail(f"{key}.lr", "a number > 0", lr)
    if "weight_decay" in options:
        number(0.0)(options["weight_decay"], f"{key}.weight_decay")


ENGINE_OPTIMIZER_KEYS = ("param_groups",)
"""Keys of the ``optimizer`` section the engine consumes (the rest go to the OPTIMIZERS entry)."""
ENGINE_SCHEDULER_KEYS = ("warmup_epochs", "warmup_steps")
"""Keys of the ``scheduler`` section the engine consumes: linear warmup, for every schedule."""


@OPTIMIZERS.register("adamw")
def adamw(
    params: Any,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> Optimizer:
    """``torch.optim.AdamW`` (Loshchilov & Hutter, ICLR 2019), weight decay off by default."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps)


@OPTIMIZERS.register("adam")
def adam(
    params: Any,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> Optimizer:
    """``torch.optim.Adam`` (Kingma & Ba, ICLR 2015); ``weight_decay`` is L2 in the gradient."""
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps)


@OPTIMIZERS.register("sgd")
def sgd(
    params: Any,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    nesterov: bool = False,
) -> Optimizer:
    """``torch.optim.SGD`` with momentum 0.9 by default."""
    return torch.optim.SGD(
        params, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov
    )


@OPTIMIZERS.register("timm")
def timm_optimizer(
    params: Any, opt: str = "lamb", lr: float = 1e-3, weight_decay: float = 0.0, **options: Any
) -> Optimizer:
    """Any optimizer of timm's factory by name (``opt: lamb | lion | adan | ...``, see
    ``timm.optim.list_optimizers()``), through ``timm.optim.create_optimizer_v2`` on moekit's
    parameter groups; ``options`` go to the optimizer."""
    from timm.optim import create_optimizer_v2, list_optimizers

    if opt not in list_optimizers():
        raise ConfigError(
            f"config key 'optimizer.opt': timm has no optimizer '{opt}'"
            f"{did_you_mean(opt, list_optimizers())}"
        )
    return create_optimizer_v2(params, opt=opt, lr=lr, weight_decay=weight_decay, **options)


def build_optimizer(named: Sequence[tuple[str, nn.Parameter]], cfg: Mapping[str, Any]) -> Optimizer:
    """The ``optimizer`` section: an ``OPTIMIZERS`` entry over the parameter groups."""
    spec = dict(value(cfg, "optimizer"))
    OPTIMIZERS.check(spec, "optimizer", provided=ENGINE_OPTIMIZER_KEYS)
    check_rates(spec, "optimizer")
    groups = param_groups(named, spec.pop("param_groups", None) or [])
    return OPTIMIZERS.build(spec, params=groups)


@LR_SCHEDULERS.register("constant")
def constant(total_steps: int, steps_per_epoch: int) -> Callable[[int], float]:
    """The base learning rates throughout."""
    return lambda step: 1.0


@LR_SCHEDULERS.register("cosine")
def cosine(
    total_steps: int, steps_per_epoch: int, min_lr_ratio: float = 0.0
) -> Callable[[int], float]:
    """Cosine decay (Loshchilov & Hutter, ICLR 2017, without restarts) over the steps after
    warmup: ``r + (1 - r) · ½ (1 + cos(π t))``, ``t`` from 0 to 1, ``r`` = ``min_lr_ratio``."""

    def factor(step: int) -> float:
        t = min(step / max(total_steps, 1), 1.0)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return factor


@LR_SCHEDULERS.register("step")
def step(
    total_steps: int, steps_per_epoch: int, step_size: float = 1, gamma: float = 0.1
) -> Callable[[int], float]:
    """``γ^⌊epoch / step_size⌋`` (torch's ``StepLR`` in epochs; the IDRiD paper: 30, 0.2)."""
    if step_size <= 0:
        raise ConfigError("config key 'scheduler.step_size': expected a positive number of epochs")
    return lambda step: gamma ** math.floor(step / steps_per_epoch / step_size)


def with_warmup(factor: Callable[[int], float], warmup: int) -> Callable[[int], float]:
    """Linear warmup from ``1 / warmup`` to 1 over ``warmup`` steps, then ``factor`` of the
    steps after warmup."""

    def warmed(step: int) -> float:
        return (step + 1) / warmup if step < warmup else factor(step - warmup)

    return warmed


def build_scheduler(
    optimizer: Optimizer, cfg: Mapping[str, Any], steps_per_epoch: int, epochs: int
) -> LambdaLR:
    """The ``scheduler`` section: an ``LR_SCHEDULERS`` factor of the optimizer step, after the
    section's linear warmup, as a ``LambdaLR``. A plain function of the step: a checkpoint
    saves only the step count, so a resumed run follows its current config."""
    spec = dict(value(cfg, "scheduler"))
    LR_SCHEDULERS.check(spec, "scheduler", provided=ENGINE_SCHEDULER_KEYS)
    warmup_epochs = spec.pop("warmup_epochs", 0)
    warmup_steps = spec.pop("warmup_steps", None)
    if warmup_steps is None:
        warmup_steps = round(
            number(0.0)(warmup_epochs, "scheduler.warmup_epochs") * steps_per_epoch
        )
    warmup = integer(0)(warmup_steps, "scheduler.warmup_steps")
    factor = LR_SCHEDULERS.build(
        spec, total_steps=steps_per_epoch * epochs - warmup, steps_per_epoch=steps_per_epoch
    )
    return LambdaLR(optimizer, with_warmup(factor, warmup))


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
