"""The run directory: everything a training run leaves behind.

::

    runs/<name>-<YYYYmmdd-HHMMSS>/     (or --run-dir)
      config.yaml        the resolved config
      metrics.csv        one row per epoch and split (columns: epoch, split, then values)
      summary.json       status, final and best values
      train.log          the log (epoch summaries, checkpoints, errors)
      checkpoints/last   the latest epoch (see moekit.engine.checkpoint)
      checkpoints/best   the best epoch by eval.monitor
      figures/*.png      one training curve per loss and metric
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from moekit import config as config_io
from moekit.errors import ConfigError
from moekit.fileio import atomic_write_text

LOGGER_NAME = "moekit.train"


def new_run_path(cfg: Mapping[str, Any]) -> Path:
    """``<output_dir>/<name>-<timestamp>``, with a numeric suffix if it already exists."""
    root = Path(cfg.get("output_dir", "runs"))
    stem = f"{cfg.get('name', 'run')}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = root / stem, 1
    while path.exists():
        path, n = root / f"{stem}-{n}", n + 1
    return path


class RunDir:
    """Writes the files of one run; every file is replaced atomically."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.figures = self.path / "figures"
        self.metrics_csv = self.path / "metrics.csv"
        self.summary_json = self.path / "summary.json"
        self.config_yaml = self.path / "config.yaml"
        self.log_file = self.path / "train.log"

    def create(self, fresh: bool) -> None:
        """Make the folders; a fresh run refuses a directory that already holds a run."""
        if fresh and (self.config_yaml.exists() or any(self.checkpoints.glob("*"))):
            raise ConfigError(
                f"{self.path}: already holds a run; pass --resume {self.path} to continue it "
                "or choose another --run-dir"
            )
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self.figures.mkdir(parents=True, exist_ok=True)

    def save_config(self, cfg: Mapping[str, Any]) -> None:
        config_io.save(cfg, self.config_yaml)

    def read_metrics(self, up_to_epoch: int) -> list[dict[str, Any]]:
        """Rows of ``metrics.csv`` for epochs ``<= up_to_epoch`` (for a resumed run)."""
        if not self.metrics_csv.exists():
            return []
        frame = pd.read_csv(self.metrics_csv)
        frame = frame[frame["epoch"] <= up_to_epoch]
        return [
            {k: v for k, v in row.items() if not _missing(v)} for row in frame.to_dict("records")
        ]

    def write_metrics(self, rows: Sequence[Mapping[str, Any]]) -> None:
        frame = pd.DataFrame(list(rows))
        atomic_write_text(self.metrics_csv, frame.to_csv(index=False))

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        atomic_write_text(self.summary_json, json.dumps(json_safe(summary), indent=2) + "\n")

    def open_log(self, main_process: bool) -> logging.Logger:
        """The run's logger on the main process (silent elsewhere): everything to ``train.log``,
        INFO and WARNING (epoch summaries) to stderr; errors reach stderr as the exception."""
        logger = logging.getLogger(f"{LOGGER_NAME}.{id(self)}")
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
        if main_process:
            file = logging.FileHandler(self.log_file)
            file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            console = logging.StreamHandler()
            console.setLevel(logging.INFO)
            console.addFilter(lambda record: record.levelno < logging.ERROR)
            console.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(file)
            logger.addHandler(console)
        return logger


def close_log(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)


def _missing(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def json_safe(node: Any) -> Any:
    """JSON has no NaN: write undefined values as null."""
    if isinstance(node, Mapping):
        return {k: json_safe(v) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [json_safe(v) for v in node]
    if isinstance(node, float) and not math.isfinite(node):
        return None
    return node
