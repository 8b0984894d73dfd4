"""The ODIR study's on-site submission file: the template's ids in order with 0/1 ``D, G, A``.

The study's course variant ships ``onsite_test_submission.csv`` with one column ``id`` (the
image file names, e.g. ``913_right.jpg``); a submission is that table with the decisions
``p_c > t_c`` of every class added, in the template's row order. The thresholds are the run's:
tuned per class on validation with ``eval.thresholds: tune``, else ``eval.threshold``
(``moekit predict`` decides with them). Predictions are matched to the template's rows by the
image's file name without its extension, as ``moekit predict`` names its inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from moekit.data.odir import STUDY_CLASSES, STUDY_LAYOUT
from moekit.errors import ConfigError, DataError
from moekit.fileio import atomic_write_text

TEMPLATE_SPLIT = "onsite_test"


def read_template(path: str | Path) -> list[str]:
    """The ids of a submission template, in order (its ``id`` column; other columns ignored).

    A missing file, a missing ``id`` column, an empty or repeated id is a :class:`DataError`
    naming the file."""
    path = Path(path)
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: submission template not found") from None
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{path}: cannot read CSV ({type(exc).__name__}: {exc})") from None
    column = STUDY_LAYOUT.id_column
    if column not in table.columns:
        raise DataError(f"{path}: no '{column}' column (columns: {', '.join(table.columns)})")
    ids = [str(v).strip() for v in table[column]]
    for row, image_id in enumerate(ids, start=2):
        if not image_id:
            raise DataError(f"{path} row {row}: empty '{column}'")
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise DataError(f"{path}: id '{repeated[0]}' is listed twice")
    return ids


def template_of_run(cfg: Mapping[str, Any]) -> Path:
    """The on-site template of a run's ODIR data: ``<root>/onsite_test_submission.csv`` of its
    first ``odir`` dataset (test, val, then train)."""
    data = cfg.get("data") or {}
    for split in ("test", "val", "train"):
        spec = data.get(split)
        if isinstance(spec, Mapping) and spec.get("type") == "odir" and spec.get("root"):
            return STUDY_LAYOUT.table(Path(spec["root"]), TEMPLATE_SPLIT)
    raise ConfigError(
        "--submission: the run has no 'odir' dataset to take the template from; give --template"
    )


def submission_table(
    ids: Sequence[str],
    decisions: Mapping[str, Sequence[int]],
    classes: Sequence[str] = STUDY_CLASSES,
) -> pd.DataFrame:
    """``id, D, G, A`` in the template's order. ``decisions`` maps an image's file name without
    extension (or with it) to its 0/1 decisions; an id without one is a :class:`DataError`."""
    rows = []
    for image_id in ids:
        found = decisions.get(image_id, decisions.get(Path(image_id).stem))
        if found is None:
            raise DataError(f"submission: no prediction for the template's id '{image_id}'")
        if len(found) != len(classes):
            raise ValueError(f"submission: {len(found)} decisions for {len(classes)} classes")
        rows.append([image_id, *(int(bool(v)) for v in found)])
    return pd.DataFrame(rows, columns=[STUDY_LAYOUT.id_column, *classes])


def decisions_from_predictions(
    rows: Sequence[Mapping[str, Any]], task: str, classes: Sequence[str] = STUDY_CLASSES
) -> dict[str, list[int]]:
    """``{input id: [0/1 per class]}`` from ``moekit predict``'s rows (its
    ``<task>/positive/<class>`` columns)."""
    columns = [f"{task}/positive/{c}" for c in classes]
    found = {}
    for row in rows:
        missing = [c for c in columns if c not in row]
        if missing:
            raise ConfigError(f"--submission: the predictions have no column '{missing[0]}'")
        found[str(row["id"])] = [int(row[c]) for c in columns]
    return found


def write_submission(
    path: str | Path,
    ids: Sequence[str],
    decisions: Mapping[str, Sequence[int]],
    classes: Sequence[str] = STUDY_CLASSES,
) -> Path:
    """Write the submission CSV (:func:`submission_table`) atomically; returns its path."""
    table = submission_table(ids, decisions, classes)
    return atomic_write_text(Path(path), table.to_csv(index=False))
