"""Collate per-sample dicts into a :class:`moekit.types.Batch`.

A sample is a dict::

    {"inputs": Tensor | {modality: Tensor},
     "targets": {task: Tensor},        # a filler of the right shape where unlabelled
     "has_target": {task: bool},
     "meta": {key: value}}             # ids, present-modality flags, ...
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from moekit.types import Batch


def _stack(values: Sequence[Any]) -> Any:
    first = values[0]
    if isinstance(first, Tensor):
        return torch.stack(list(values))
    if isinstance(first, Mapping):
        return {k: _stack([v[k] for v in values]) for k in first}
    if isinstance(first, bool | int | float):
        return torch.tensor(values)
    return list(values)


def collate_samples(samples: Sequence[Mapping[str, Any]]) -> Batch:
    """Stack samples into a Batch; ``has_target`` becomes ``bool[B]`` per task."""
    tasks = samples[0]["targets"].keys()
    return Batch(
        inputs=_stack([s["inputs"] for s in samples]),
        targets={t: torch.stack([s["targets"][t] for s in samples]) for t in tasks},
        has_target={
            t: torch.tensor([bool(s["has_target"][t]) for s in samples], dtype=torch.bool)
            for t in tasks
        },
        meta=_stack([s.get("meta", {}) for s in samples]) if samples[0].get("meta") else {},
    )
