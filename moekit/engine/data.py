"""Data loaders whose order and randomness are functions of ``(seed, epoch)`` only.

The training order of epoch ``e`` is a permutation drawn from ``(seed, e)`` and loader workers
draw their seeds from a generator re-seeded from ``(seed, e, process)``, so a run resumed at
epoch ``e`` sees exactly the batches (and augmentations) of an uninterrupted run. Datasets
with a ``set_epoch(epoch)`` method (to re-seed their augmentation) are told the epoch too.
Under data parallelism accelerate shards each global batch across the processes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from moekit.data.collate import collate_samples
from moekit.data.samplers import BalancedSourceSampler
from moekit.errors import ConfigError
from moekit.registry import SAMPLERS
from moekit.rng import derived_seed


class EpochSampler(Sampler[int]):
    """All indices once per epoch, shuffled by ``(seed, epoch)`` (or in order)."""

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True) -> None:
        self.size, self.seed, self.shuffle = int(size), int(seed), bool(shuffle)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.size))
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.size, generator=generator).tolist())


@SAMPLERS.register("random")
def random_sampler(dataset: Dataset, seed: int) -> Sampler[int]:
    """Every sample once per epoch, shuffled from ``(seed, epoch)``."""
    return EpochSampler(len(dataset), seed)


@SAMPLERS.register("balanced_source")
def balanced_source(
    dataset: Dataset,
    seed: int,
    weights: Mapping[str, float] | None = None,
    num_samples: int | None = None,
) -> Sampler[int]:
    """Batches that mix the dataset's sources (:class:`BalancedSourceSampler`); the dataset
    must say the source of each sample (``dataset.sources``)."""
    if not hasattr(dataset, "sources"):
        raise ConfigError(
            "config key 'data.sampler': 'balanced_source' needs a dataset with 'sources' "
            f"({type(dataset).__name__} has none)"
        )
    return BalancedSourceSampler(
        dataset.sources, seed=seed, weights=weights, num_samples=num_samples
    )


def build_loader(
    dataset: Dataset, data: Mapping[str, Any], *, train: bool, seed: int
) -> DataLoader:
    """A loader over ``dataset`` with the ``data`` section's batch size and workers."""
    batch_size = data["batch_size"] if train else data["eval_batch_size"] or data["batch_size"]
    sampler = (
        SAMPLERS.build(data["sampler"] or {"type": "random"}, dataset=dataset, seed=seed)
        if train
        else EpochSampler(len(dataset), shuffle=False)
    )
    pin_memory = torch.cuda.is_available() if data["pin_memory"] is None else data["pin_memory"]
    return DataLoader(
        dataset,
        batch_size=int(batch_size),
        sampler=sampler,
        num_workers=int(data["num_workers"]),
        collate_fn=collate_samples,
        drop_last=bool(data["drop_last"]) if train else False,
        pin_memory=bool(pin_memory),
        generator=torch.Generator().manual_seed(seed),
    )


def set_epoch(loader: DataLoader, epoch: int, seed: int, process_index: int = 0) -> None:
    """Point a (prepared) loader, its sampler, its dataset and its workers at ``epoch``."""
    loader.set_epoch(epoch) if hasattr(loader, "set_epoch") else loader.sampler.set_epoch(epoch)
    dataset = loader.dataset
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    if loader.generator is not None:
        loader.generator.manual_seed(derived_seed(seed, epoch, process_index, 1))
