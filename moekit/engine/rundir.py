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
      config_history.jsonl  the overrides a resumed run applied, one line per resume
      .moekit.lock       held (flock) by the one process that writes into the run

A run directory is owned by one process at a time: :class:`RunLock` takes an exclusive
``flock`` on ``.moekit.lock`` (released when the process ends, however it ends, so a lock left
by a killed process is never in the way) for training, resuming and every command that writes
into a run.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from moekit import config as config_io
from moekit.errors import BusyError, CheckpointError, ConfigError
from moekit.fileio import atomic_write_text

LOGGER_NAME = "moekit.train"
LOCK_FILE = ".moekit.lock"


def make_dir(path: Path, what: str) -> bool:
    """Create the directory ``path`` (and parents); returns whether it was created now. A path
    that is a file, or lies under one, is a one-line :class:`ConfigError` naming ``what``."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} '{path}': is a file, not a directory")
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"{what} '{path}': a part of the path is a file") from None
    return created


class RunLock:
    """An exclusive lock on a directory, held by this process until :meth:`release` (or its
    end): a second moekit process that wants to write there gets a one-line
    :class:`BusyError` naming the holder."""

    def __init__(self, directory: str | Path, command: str) -> None:
        self.directory, self.command = Path(directory), command
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        file = self.directory / LOCK_FILE
        fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 512).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise BusyError(
                f"{self.directory}: in use by another moekit process ({holder}); wait for it "
                "to finish or choose another directory"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}: {self.command}, since {time.strftime('%c')}".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


@contextmanager
def run_lock(directory: str | Path, command: str) -> Iterator[None]:
    """Hold :class:`RunLock` on an existing ``directory`` for the block (in the main process
    of a multi-process launch; the others write nothing into the run)."""
    if not Path(directory).is_dir():
        raise CheckpointError(f"{directory}: no such run directory")
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    lock = RunLock(directory, command).acquire()
    try:
        yield
    finally:
        lock.release()


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

    def has_checkpoint(self) -> bool:
        """Whether the run saved a checkpoint (a run killed before its first one has none)."""
        return any((d / "model.safetensors").is_file() for d in self.checkpoints.glob("*"))

    def create(self, fresh: bool, command: str) -> list[Path]:
        """Take the run's lock and make its folders. A fresh run refuses a directory holding a
        checkpoint; a resumed one needs it. Returns what was created (removed again if the
        set-up fails, so a failed start leaves nothing behind)."""
        created = [self.path] if make_dir(self.path, "run directory") else []
        self.lock = RunLock(self.path, command).acquire()
        if fresh and self.has_checkpoint():
            self.lock.release()
            raise ConfigError(
                f"{self.path}: already holds a run; pass --resume {self.path} to continue it "
                "or choose another --run-dir"
            )
        if not fresh and not self.has_checkpoint():
            self.lock.release()
            raise ConfigError(
                f"{self.path}: no checkpoint to resume (the run stopped before its first epoch "
                f"ended); start it again: moekit train {self.config_yaml} --run-dir {self.path}"
            )
        for folder in (self.checkpoints, self.figures):
            if not folder.exists():
                folder.mkdir()
                created.append(folder)
        if not self.log_file.exists():
            created.append(self.log_file)
        return created

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
