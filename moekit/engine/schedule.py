"""Phase schedules: changes to the model at fractions of training.

A schedule is a list of phases; each phase but the last has ``until``, the fraction of the
epochs it lasts to (exclusive). The phase of epoch ``e`` (0-based, of ``E``) is the first whose
``until`` exceeds ``e / E``. Two schedules use it:

- ``routing_schedule``: the MoE selection rule of each phase, applied with
  :func:`moekit.moe.set_routing` (same gate parameters, so the optimizer is unaffected)::

      routing_schedule:
        - {until: 0.5, router: softmax}     # all experts for the first half (the IDRiD paper)
        - {router: top_p, p: 0.5}           # then top-p; other keys are router options
        # optional per phase: layers: "<regex of MoE layer names>"

- ``freeze_schedule``: the parameters frozen in each phase (staged fine-tuning), on top of
  ``train.freeze``::

      freeze_schedule:
        - {until: 0.25, freeze: ["backbone\\\\..*"]}
        - {freeze: []}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from moekit.errors import ConfigError


@dataclass(frozen=True)
class Phase:
    """One phase: it lasts while the epoch fraction is below ``until``."""

    until: float
    options: dict[str, Any] = field(default_factory=dict)


def parse_phases(raw: Any, key: str) -> list[Phase]:
    """Validate a phase list; ``until`` must increase in ``(0, 1]`` and the last omits it."""
    if raw in (None, []):
        return []
    if not isinstance(raw, Sequence) or isinstance(raw, str):
        raise ConfigError(f"config key '{key}': expected a list of phases, got {raw!r}")
    phases, previous = [], 0.0
    for i, entry in enumerate(raw):
        where = f"{key}[{i}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"config key '{where}': expected a mapping, got {entry!r}")
        options = dict(entry)
        last = i == len(raw) - 1
        until = options.pop("until", None)
        if until is None:
            if not last:
                raise ConfigError(f"config key '{where}.until': only the last phase may omit it")
            until = float("inf")
        elif not isinstance(until, int | float) or not previous < until <= 1.0:
            raise ConfigError(
                f"config key '{where}.until': expected a fraction in ({previous}, 1], got {until!r}"
            )
        phases.append(Phase(float(until), options))
        previous = float(until)
    return phases


def phase_index(phases: Sequence[Phase], epoch: int, epochs: int) -> int | None:
    """Index of the phase of 0-based ``epoch`` of ``epochs`` (None without phases)."""
    if not phases:
        return None
    fraction = epoch / epochs
    for i, phase in enumerate(phases):
        if fraction < phase.until:
            return i
    return len(phases) - 1


def router_config(phase: Phase, key: str) -> tuple[dict[str, Any], str | None]:
    """``(router cfg, layers regex)`` of a routing phase: ``{router: name, **options}``."""
    options = dict(phase.options)
    router = options.pop("router", None)
    layers = options.pop("layers", None)
    if isinstance(router, str):
        router = {"type": router}
    if not isinstance(router, Mapping) or "type" not in router:
        raise ConfigError(f"config key '{key}.router': expected a router name or {{type: ...}}")
    return {**router, **options}, layers


def apply_routing(model: nn.Module, phase: Phase, key: str) -> int:
    """Switch the model's MoE layers to the phase's router; returns the layers changed."""
    from moekit.moe import set_routing

    router, layers = router_config(phase, key)
    changed = set_routing(model, router, layers)
    if not changed:
        raise ConfigError(
            f"config key '{key}': no MoE layer{' matches ' + repr(layers) if layers else ''} "
            f"in {type(model).__name__}"
        )
    return changed


def frozen_patterns(phase: Phase | None, key: str) -> list[str]:
    """The ``freeze`` patterns of a freeze phase."""
    if phase is None:
        return []
    unknown = set(phase.options) - {"freeze"}
    if unknown:
        raise ConfigError(
            f"config key '{key}.{sorted(unknown)[0]}' is not known; valid: until, freeze"
        )
    patterns = phase.options.get("freeze", [])
    return [patterns] if isinstance(patterns, str) else list(patterns)
