"""A model as a program that runs without moekit: ``torch.export`` (``model.pt2``) or TorchScript
(``model.torchscript.pt``), written only when it gives the model's outputs.

The program maps one input (a batch of one: ``[1, C, H, W]``, or ``{modality: tensor}`` and
``present bool[1, M]`` for a multi-modal model) to a tuple of per-task probabilities in the
tasks' order (:func:`moekit.analysis.tta.task_probabilities`: softmax, sigmoid or values).

Faithfulness is checked twice. First, ``torch.export`` must capture the model without
guessing: it refuses a forward whose tensor shapes or control flow depend on the values of the
input. moekit's MoE dispatch is such a forward — it sorts the (token, expert) pairs and reads
each expert's group size on the host (``DispatchPlan``), under top-k and top-p routing and
under dense routing alike — and so is a model that picks rows by a mask's values (the present
modalities of a multi-modal model). A TorchScript trace of either would silently replay the
traced input's expert groups and rows for every input, so neither is written. Models without
MoE layers (an ODIR classifier with an MLP head, single-task baselines) are exported. Second,
the program's outputs are compared with the model's on the given inputs (:data:`TOLERANCE`).
When either check fails, nothing is written and the error says why.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moekit.analysis.flops import traceable
from moekit.analysis.tta import task_probabilities
from moekit.errors import ConfigError
from moekit.types import Batch, Task

FORMATS = {"export": "model.pt2", "torchscript": "model.torchscript.pt"}
"""``--format`` values and the file each writes."""
TOLERANCE = 1e-5
"""Largest difference allowed between the program's probabilities and the model's."""


class Probabilities(nn.Module):
    """``model`` as ``inputs (, present) -> tuple of per-task probabilities``."""

    def __init__(self, model: nn.Module, tasks: Mapping[str, Task]) -> None:
        super().__init__()
        self.model = model
        self.tasks = dict(tasks)

    def forward(self, inputs: Any, present: Tensor | None = None) -> tuple[Tensor, ...]:
        if present is None:
            preds = self.model(inputs).preds
        else:
            preds = self.model(inputs, present=present).preds
        return tuple(task_probabilities(self.tasks[n], preds[n]) for n in self.tasks)


def _arguments(batch: Batch) -> tuple[Any, ...]:
    return (batch.inputs,) if batch.present is None else (batch.inputs, batch.present)


def _max_difference(program: Any, wrapper: nn.Module, batches: Sequence[Batch]) -> float:
    worst = 0.0
    with torch.no_grad():
        for batch in batches:
            expected = wrapper(*_arguments(batch))
            got = program(*_arguments(batch))
            for a, b in zip(expected, got, strict=True):
                worst = max(worst, float((a.float() - b.float()).abs().max()))
    return worst


def export_program(
    model: nn.Module, tasks: Mapping[str, Task], batches: Sequence[Batch], fmt: str, path: Path
) -> float:
    """Write ``model`` as a ``fmt`` program (:data:`FORMATS`) to ``path`` after checking it
    (see the module docstring) on ``batches`` of one input each; returns the largest
    difference measured. A one-line :class:`~moekit.errors.ConfigError` says why a model
    cannot be written faithfully."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    wrapper = Probabilities(model, tasks).eval()
    example = _arguments(batches[0])
    with traceable(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # torch prints the partial graph
                exported = torch.export.export(wrapper, example)
        except Exception as exc:  # torch raises several types for data-dependent code
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(
                f"--format {fmt}: the model's forward depends on the values of its input "
                f"({type(exc).__name__}: {first[:120]}): an MoE layer's expert groups or rows "
                "chosen by a mask, so no program of fixed shapes gives its outputs for every "
                "input; use moekit.load_artifact or moekit predict"
            ) from None
        program: Any = exported.module()
        if fmt == "torchscript":
            program = torch.jit.trace(wrapper, example, strict=False, check_trace=False)
    difference = _max_difference(program, wrapper, batches)
    if difference > TOLERANCE:
        raise ConfigError(
            f"--format {fmt}: the program's outputs differ from the model's by {difference:.3g} "
            f"(> {TOLERANCE:g}); nothing written"
        )
    if fmt == "torchscript":
        with warnings.catch_warnings():  # deprecated in favour of torch.export, still loadable
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.save(program, str(path))
    else:
        torch.export.save(exported, str(path))
    return difference
