"""Predicting a list of inputs into a folder: what ``moekit predict`` runs.

:func:`load_predictor` makes a :class:`~moekit.inference.predictor.Predictor` of a run
directory (its checkpoint, config, thresholds and the input pipeline read off its dataset) or
of an artifact folder (everything from the folder). :func:`predict_to_folder` runs it over the
inputs one at a time and writes, under the output folder::

    predictions.csv            one row per input that could be read (moekit.inference.outputs)
    masks/<id>_<task>.png      segmentation masks at the input's original resolution
    maps/<id>_<task>.npy       dense regression maps (float32, original resolution)
    overlays/<id>.png          the overlay figure of each input (moekit.inference.overlay)

An input whose file cannot be read is reported in one line (``report``) and skipped; the
others are predicted. :class:`PredictResult` holds the rows in input order and the failures,
for writers of other formats (a challenge's submission file takes the rows in its template's
order: give ``predict`` a CSV with the template's ids and files).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from moekit.errors import DataError
from moekit.inference.artifact import is_artifact, load_artifact
from moekit.inference.inputs import InputItem, pipeline_from_config
from moekit.inference.outputs import (
    CSV_NAME,
    OVERLAYS,
    prediction_row,
    write_files,
    write_predictions_csv,
)
from moekit.inference.overlay import plot_overlay
from moekit.inference.predictor import Predictor, decision_thresholds


@dataclass
class PredictResult:
    """What :func:`predict_to_folder` did: the ``predictions.csv`` rows in input order, the
    inputs that failed with their one-line reasons, and the CSV written (``None`` if no
    input could be read)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    failures: list[tuple[InputItem, str]] = field(default_factory=list)
    csv: Path | None = None


def load_predictor(
    source: str | Path,
    checkpoint: str = "best",
    split: str | None = None,
    tta: str = "none",
    device: str | torch.device = "cpu",
) -> Predictor:
    """The predictor of a run directory (``checkpoint``; the input pipeline read off its
    ``split`` dataset, which must be on disk) or of an artifact folder."""
    from moekit.engine.checkpoint import checkpoint_dir, load_model

    if is_artifact(source):
        return load_artifact(source, device).predictor(tta, device)
    model, cfg, tasks = load_model(source, checkpoint, device)
    pipeline, _ = pipeline_from_config(cfg, split)
    thresholds = decision_thresholds(cfg, tasks, checkpoint_dir(source, checkpoint))
    return Predictor(model, tasks, pipeline, thresholds, tta, device)


def _stderr(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def predict_to_folder(
    predictor: Predictor,
    items: Sequence[InputItem],
    out: str | Path,
    overlays: bool = True,
    report: Callable[[str], None] = _stderr,
    progress: Callable[[Iterable[InputItem]], Iterable[InputItem]] | None = None,
) -> PredictResult:
    """Predict ``items`` one at a time into ``out`` (see the module docstring). ``report``
    receives the one-line error of each input that cannot be read; ``progress`` wraps the
    items (default: a progress bar on a terminal)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if progress is None:
        progress = lambda it: tqdm(  # noqa: E731
            it, desc="predict", unit="input", disable=not sys.stderr.isatty()
        )
    result = PredictResult()
    multimodal = predictor.pipeline.dict_inputs
    for item in progress(items):
        try:
            prediction = predictor.predict(item)
        except DataError as exc:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            result.failures.append((item, message))
            report(f"moekit: error: {message}")
            continue
        files = write_files(prediction, predictor.tasks, out)
        if overlays:
            plot_overlay(prediction, predictor.tasks, out / OVERLAYS / f"{item.id}.png")
        result.rows.append(prediction_row(prediction, predictor.tasks, files, multimodal))
    if result.rows:
        result.csv = write_predictions_csv(result.rows, out / CSV_NAME)
    return result
