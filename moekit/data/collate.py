"""Collate per-sample dicts into a :class:`moekit.types.Batch`.

A sample is a dict::

    {"inputs": Tensor | {modality: Tensor},   # multi-modal: only the modalities it has
     "modalities": {modality: shape},         # multi-modal: every modality of the dataset
     "targets": {task: Tensor},               # a filler of the right shape where unlabelled
     "has_target": {task: bool},
     "meta": {key: value}}                    # ids, sources, ...

Single-tensor samples (``inputs`` a tensor, no ``modalities``) are stacked as they are.

Multi-modal samples hold in ``inputs`` only the modalities they *have*; ``modalities``
declares the dataset's modalities in order with the shape of one sample's tensor (e.g.
``{"fundus": (3, 256, 384), "oct": (16, 128, 64)}``). The batch then has one column per
declared modality, in that order, also for a modality that no sample of the batch has:
``inputs[m]`` is ``[B, *shape]`` with zeros in the rows of samples without ``m``, and
``present[b, m]`` tells which rows are real. Samples without ``modalities`` are collated over
the modalities that appear in the batch (in order of first appearance, shapes taken from the
samples that have them).

Every sample must carry a target (a filler where unlabelled) for every task; ``has_target`` says
which are labels, task by task, so a sample can have some labels and not others.
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


def declared_modalities(samples: Sequence[Mapping[str, Any]]) -> dict[str, tuple[int, ...]]:
    """The batch's modality columns ``{modality: per-sample shape}``, in order.

    From the samples' ``modalities`` declaration (which must be the same for all of them), else
    from the modalities the samples have, in order of first appearance.
    """
    declarations = [s.get("modalities") for s in samples]
    if declarations[0] is not None:
        declared = {name: tuple(int(n) for n in shape) for name, shape in declarations[0].items()}
        for i, other in enumerate(declarations[1:], start=1):
            if other is None or list(other) != list(declared):
                raise ValueError(
                    f"collate: sample {i} declares modalities {other and list(other)}, "
                    f"sample 0 {list(declared)}"
                )
        return declared
    shapes: dict[str, tuple[int, ...]] = {}
    for sample in samples:
        for name, tensor in sample["inputs"].items():
            shapes.setdefault(name, tuple(tensor.shape))
    return shapes


def collate_modalities(
    samples: Sequence[Mapping[str, Any]],
) -> tuple[dict[str, Tensor], Tensor]:
    """``({modality: [B, *shape]}, present bool[B, M])``: absent entries are zero tensors."""
    columns = declared_modalities(samples)
    inputs: dict[str, Tensor] = {}
    present = torch.zeros(len(samples), len(columns), dtype=torch.bool)
    for m, (name, shape) in enumerate(columns.items()):
        have = [(b, s["inputs"][name]) for b, s in enumerate(samples) if name in s["inputs"]]
        for b, tensor in have:
            if tuple(tensor.shape) != shape:
                raise ValueError(
                    f"collate: modality '{name}' of sample {b} has shape {list(tensor.shape)}, "
                    f"expected {list(shape)}"
                )
        dtype = have[0][1].dtype if have else torch.float32
        column = torch.zeros((len(samples), *shape), dtype=dtype)
        for b, tensor in have:
            column[b] = tensor
            present[b, m] = True
        inputs[name] = column
    for b, sample in enumerate(samples):
        unknown = set(sample["inputs"]) - set(columns)
        if unknown:
            raise ValueError(
                f"collate: sample {b} has modality '{sorted(unknown)[0]}', "
                f"not among the declared {list(columns)}"
            )
    return inputs, present


def collate_samples(samples: Sequence[Mapping[str, Any]]) -> Batch:
    """Stack samples into a Batch; ``has_target`` becomes ``bool[B]`` per task and multi-modal
    inputs get their ``present`` mask (see the module docstring)."""
    tasks = list(samples[0]["targets"])
    for i, sample in enumerate(samples):
        if list(sample["targets"]) != tasks:
            raise ValueError(
                f"collate: sample {i} has targets for {list(sample['targets'])}, sample 0 for "
                f"{tasks} (give every task a filler target and has_target False)"
            )
    multimodal = isinstance(samples[0]["inputs"], Mapping)
    if any(isinstance(s["inputs"], Mapping) != multimodal for s in samples):
        raise ValueError("collate: samples mix tensor inputs and {modality: tensor} inputs")
    if multimodal:
        inputs, present = collate_modalities(samples)
    else:
        inputs, present = _stack([s["inputs"] for s in samples]), None
    return Batch(
        inputs=inputs,
        targets={t: torch.stack([s["targets"][t] for s in samples]) for t in tasks},
        has_target={
            t: torch.tensor([bool(s["has_target"][t]) for s in samples], dtype=torch.bool)
            for t in tasks
        },
        meta=_stack([s.get("meta", {}) for s in samples]) if samples[0].get("meta") else {},
        present=present,
    )
