"""What the analysis tools share: a trained run's model, config, tasks and split loaders."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from moekit.errors import ConfigError
from moekit.models.single_task import task_position
from moekit.types import Batch, Task


def progress(desc: str) -> Any:
    """A ``tqdm`` wrapper for batches, shown only on a terminal."""
    return lambda it: tqdm(it, desc=desc, leave=False, disable=not sys.stderr.isatty())


def split_loader(cfg: Mapping[str, Any], split: str) -> DataLoader:
    """An evaluation loader (in order, no shuffling) over the config's ``split`` dataset."""
    from moekit.engine.data import build_loader
    from moekit.engine.experiment import build_dataset
    from moekit.sections import settings

    data = settings(cfg, "data")
    return build_loader(build_dataset(cfg, split), data, train=False, seed=int(cfg.get("seed", 0)))


def input_batch_size(inputs: Tensor | Mapping[str, Tensor] | Batch) -> int:
    """The number of samples in model inputs (a tensor, a dict of modality tensors or a
    batch)."""
    if isinstance(inputs, Batch):
        return inputs.batch_size
    first = inputs if isinstance(inputs, Tensor) else next(iter(inputs.values()))
    return int(first.shape[0])


def example_inputs(
    cfg: Mapping[str, Any],
    split: str = "val",
    batch: int = 1,
    input_size: Sequence[int] | None = None,
) -> Tensor | Batch:
    """Model inputs: ``batch`` random images of ``input_size`` (``[C,] H, W``; 3 channels by
    default, seeded), else the first ``batch`` samples of the config's ``split`` dataset as a
    :class:`~moekit.types.Batch` (with ``present``: a modality a sample lacks stays absent)."""
    from moekit.data.collate import collate_samples
    from moekit.engine.experiment import build_dataset

    if input_size:
        shape = list(input_size) if len(input_size) == 3 else [3, *input_size]
        if len(shape) != 3:
            raise ConfigError(f"--input-size: expected [C] H W, got {list(input_size)}")
        generator = torch.Generator().manual_seed(int(cfg.get("seed", 0)))
        return torch.randn(batch, *shape, generator=generator)
    dataset = build_dataset(cfg, split)
    if len(dataset) < batch:
        raise ConfigError(f"data.{split}: {len(dataset)} samples, fewer than --batch {batch}")
    return collate_samples([dataset[i] for i in range(batch)])


def only_task(task_names: Iterable[str], task: str, batch: int, device: Any) -> dict[str, Tensor]:
    """A ``task_mask`` that runs ``task`` on every sample and no other task."""
    return {
        name: torch.full((batch,), name == task, dtype=torch.bool, device=device)
        for name in task_names
    }


def check_task(tasks: Sequence[str], task: str, where: str | Path) -> int:
    """The id of ``task``; an unknown name fails naming ``where`` and the valid tasks."""
    try:
        return task_position(tasks, task)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


@dataclass
class TrainedRun:
    """A run's checkpoint loaded for analysis (:func:`moekit.engine.load_model`)."""

    path: Path
    checkpoint: str
    model: nn.Module
    cfg: dict[str, Any]
    tasks: dict[str, Task]

    @classmethod
    def load(cls, path: str | Path, checkpoint: str = "best") -> TrainedRun:
        from moekit.engine import load_model

        model, cfg, tasks = load_model(path, checkpoint)
        return cls(Path(path), checkpoint, model, cfg, tasks)

    def loader(self, split: str) -> DataLoader:
        return split_loader(self.cfg, split)


def untrained_model(
    path: str | Path, overrides: Iterable[str] = ()
) -> tuple[nn.Module, dict[str, Any], dict[str, Task]]:
    """A freshly initialised model (seeded by the config's ``seed``) from a config file."""
    from moekit import config as config_io
    from moekit.engine.seeding import seed_everything
    from moekit.registry import MODELS, import_builtins
    from moekit.types import tasks_from_config

    import_builtins()
    cfg = config_io.load(path, overrides)
    if "model" not in cfg:
        raise ConfigError(f"{path}: the config defines no model")
    seed_everything(int(cfg.get("seed", 0)))
    tasks = tasks_from_config(cfg)
    return MODELS.build(cfg["model"], tasks=tasks).eval(), cfg, tasks
