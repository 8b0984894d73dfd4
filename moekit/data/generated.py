"""Images a generator added to a dataset folder (``moekit data vae-augment``), listed in
``generated.csv`` at the folder's root (columns ``split, id, class``).

Loaders keep them as training samples but leave them out of ``label_counts``, so that a
class-balanced loss with ``counts: auto`` weighs the real labels: counting the generated images
would balance the counts and turn class-balanced BCE into plain BCE (what the ODIR study's
code did after its VAE balancing).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from moekit.errors import DataError

GENERATED_FILE = "generated.csv"
COLUMNS = ("split", "id", "class")


def read_generated(root: str | Path, split: str) -> set[str]:
    """The ids of ``split`` that a generator added under ``root`` (empty without the file)."""
    path = Path(root) / GENERATED_FILE
    if not path.is_file():
        return set()
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not set(COLUMNS) <= set(reader.fieldnames):
            raise DataError(f"{path}: expected the columns {', '.join(COLUMNS)}")
        return {row["id"] for row in reader if row["split"] == split}


def write_generated(root: str | Path, rows: Sequence[tuple[str, str, str]]) -> Path:
    """Write ``generated.csv`` with ``(split, id, class)`` rows."""
    path = Path(root) / GENERATED_FILE
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    return path
