"""The engine's config sections, with their defaults and unknown-key checks.

Each section is a plain mapping in the YAML config; :func:`section` fills in the defaults
listed here and rejects keys that are not, naming the key and the closest valid one. The
meaning of every key is documented in ``docs/training.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moekit.errors import ConfigError, did_you_mean

TRAIN: dict[str, Any] = {
    "epochs": 1,
    "grad_accum": 1,
    "clip_grad": None,
    "mixed_precision": "no",
    "device": "auto",
    "find_unused_parameters": True,
    "freeze": [],
    "log_every": 10,
    "log_with": None,
    "save_best": True,
    "curves": True,
}
DATA: dict[str, Any] = {
    "train": None,
    "val": None,
    "test": None,
    "batch_size": 8,
    "eval_batch_size": None,
    "num_workers": 0,
    "drop_last": False,
    "pin_memory": None,
    "sampler": None,
}
EVAL: dict[str, Any] = {"monitor": None, "mode": None, "mtl_delta": None, "threshold": 0.5}
SCHEDULER: dict[str, Any] = {
    "type": "constant",
    "warmup_epochs": 0,
    "warmup_steps": None,
    "min_lr_ratio": 0.0,
    "step_size": 1,
    "gamma": 0.1,
}
OPTIMIZER: dict[str, Any] = {
    "type": "adamw",
    "lr": 1e-3,
    "weight_decay": 0.0,
    "betas": [0.9, 0.999],
    "eps": 1e-8,
    "momentum": 0.9,
    "nesterov": False,
    "param_groups": [],
}
DEBUG: dict[str, Any] = {"inject_nan_at_step": None, "nan_task": None, "stop_after_epoch": None}
MIXED_PRECISION = ("no", "fp16", "bf16")


def section(cfg: Mapping[str, Any], name: str, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``cfg[name]`` merged over ``defaults``; unknown keys are a :class:`ConfigError`."""
    given = cfg.get(name) or {}
    if not isinstance(given, Mapping):
        raise ConfigError(f"config key '{name}': expected a mapping, got {given!r}")
    for key in given:
        if key not in defaults:
            raise ConfigError(
                f"config key '{name}.{key}' is not known{did_you_mean(str(key), defaults)}; "
                f"valid: {', '.join(defaults)}"
            )
    return {**defaults, **given}


def positive_int(value: Any, key: str, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum``, else a :class:`ConfigError` naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"config key '{key}': expected an integer >= {minimum}, got {value!r}")
    return value


def train_settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The validated ``train`` section."""
    train = section(cfg, "train", TRAIN)
    positive_int(train["epochs"], "train.epochs")
    positive_int(train["grad_accum"], "train.grad_accum")
    if train["mixed_precision"] not in MIXED_PRECISION:
        raise ConfigError(
            f"config key 'train.mixed_precision': '{train['mixed_precision']}' is not one of "
            f"{', '.join(MIXED_PRECISION)}"
        )
    if train["device"] not in ("auto", "cpu"):
        raise ConfigError(f"config key 'train.device': '{train['device']}' is not auto or cpu")
    if train["log_with"] not in (None, "tensorboard"):
        raise ConfigError(f"config key 'train.log_with': '{train['log_with']}' is not tensorboard")
    if isinstance(train["freeze"], str):
        train["freeze"] = [train["freeze"]]
    return train


def eval_threshold(cfg: Mapping[str, Any]) -> float:
    """The validated ``eval.threshold``: the probability threshold of every thresholded metric
    not given its own ``threshold`` and of the prediction overlays (``sigmoid(x) > t``)."""
    value = section(cfg, "eval", EVAL)["threshold"]
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        raise ConfigError(
            f"config key 'eval.threshold': expected a number in [0, 1), got {value!r}"
        )
    return float(value)
