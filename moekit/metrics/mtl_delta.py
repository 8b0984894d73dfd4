"""Multi-task performance delta against single-task baselines (Maninis et al., CVPR 2019).

For a metric ``M_t`` with baseline ``B_t`` (e.g. the single-task model's score),
``Δ_t = (-1)^{s_t} (M_t - B_t) / B_t · 100`` with ``s_t = 1`` when lower is better, so a
positive ``Δ`` is always an improvement (in percent). Several aggregations are in use; the
variant is part of the output name:

- ``pooled``: the mean of ``Δ`` over all listed ``task/metric`` pairs (Mod-Squad's ``Δ_t``
  when each task lists its primary metric);
- ``task_mean``: the mean within each task first, then across tasks (every task weighs the
  same however many metrics it lists).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar, Literal

from moekit.errors import ConfigError
from moekit.registry import METRICS

VARIANTS = ("pooled", "task_mean")


@METRICS.register("mtl_delta")
class MultiTaskDelta:
    """``Δ`` of named metric values against ``baselines`` (``{"task/metric": value}``).

    Called as ``delta(values, higher_is_better)`` with ``values`` keyed like ``baselines``
    (and any other keys, ignored) and the direction of each metric; returns
    ``{"<variant>": mean Δ, "<task>/<metric>": Δ, ...}`` in percent. A metric missing from
    ``values`` or NaN makes the mean NaN.
    """

    higher_is_better: ClassVar[bool] = True

    def __init__(
        self, baselines: Mapping[str, float], variant: Literal["pooled", "task_mean"] = "pooled"
    ) -> None:
        if variant not in VARIANTS:
            raise ConfigError(f"mtl_delta.variant: '{variant}' is not one of {', '.join(VARIANTS)}")
        if not baselines:
            raise ConfigError("mtl_delta.baselines: expected {task/metric: baseline value}")
        for key, value in baselines.items():
            if "/" not in key:
                raise ConfigError(f"mtl_delta.baselines: key '{key}' must be 'task/metric'")
            if not value:
                raise ConfigError(
                    f"mtl_delta.baselines.{key}: a baseline of {value!r} has no delta"
                )
        self.baselines = {k: float(v) for k, v in baselines.items()}
        self.variant = variant

    def __call__(
        self, values: Mapping[str, float], higher_is_better: Mapping[str, bool]
    ) -> dict[str, float]:
        deltas = {}
        for key, base in self.baselines.items():
            if key not in higher_is_better:
                raise ConfigError(
                    f"mtl_delta.baselines: '{key}' is not a task metric; "
                    f"known: {', '.join(sorted(higher_is_better))}"
                )
            sign = 1.0 if higher_is_better[key] else -1.0
            deltas[key] = sign * (values.get(key, math.nan) - base) / base * 100.0
        if self.variant == "pooled":
            main = _mean(deltas.values())
        else:
            tasks: dict[str, list[float]] = {}
            for key, delta in deltas.items():
                tasks.setdefault(key.split("/", 1)[0], []).append(delta)
            main = _mean(_mean(v) for v in tasks.values())
        return {self.variant: main, **deltas}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan
