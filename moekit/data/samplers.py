"""Samplers that mix the sources of a multi-source dataset evenly within every batch.

IDRiD's grading images (413) outnumber its segmentation images (54) eight to one, and the two
carry disjoint label sets; a uniform shuffle gives batches with no mask at all. The IDRiD paper
alternates one grading batch and one segmentation batch. :class:`BalancedSourceSampler`
interleaves the sources at fixed shares *inside* each batch instead, so every batch (and every
gradient step) sees every task.

Use it with any dataset that exposes ``sources`` (one source name per sample)::

    sampler = BalancedSourceSampler(dataset.sources, seed=cfg["seed"])
    loader = DataLoader(dataset, batch_size=8, sampler=sampler, collate_fn=collate_samples)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)      # and dataset.set_epoch(epoch) for the augmentation
        ...
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch.utils.data import Sampler

from moekit.errors import ConfigError
from moekit.rng import derived_seed


def source_weights(
    sources: Sequence[str], weights: Mapping[str, float] | None = None
) -> torch.Tensor:
    """Per-sample probabilities (summing to 1) that give each source its share.

    With ``weights=None`` every source gets an equal share; a sample's probability is its
    source's share divided by that source's size. Suitable for
    ``torch.utils.data.WeightedRandomSampler`` when sampling with replacement is wanted.
    """
    shares = _shares(sources, weights)
    counts = {name: sum(1 for s in sources if s == name) for name in shares}
    return torch.tensor([shares[s] / counts[s] for s in sources], dtype=torch.float64)


def _shares(sources: Sequence[str], weights: Mapping[str, float] | None) -> dict[str, float]:
    names = sorted(set(sources))
    if not names:
        raise ConfigError("BalancedSourceSampler: the dataset is empty")
    if weights is None:
        weights = dict.fromkeys(names, 1.0)
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ConfigError(
            f"BalancedSourceSampler: weights name unknown sources {unknown}; sources: {names}"
        )
    raw = {name: float(weights.get(name, 0.0)) for name in names}
    if any(w < 0 for w in raw.values()) or sum(raw.values()) <= 0:
        raise ConfigError(
            f"BalancedSourceSampler: weights must be >= 0 with a positive sum, got {raw}"
        )
    total = sum(raw.values())
    return {name: w / total for name, w in raw.items() if w > 0}


class BalancedSourceSampler(Sampler[int]):
    """Yield dataset indices that interleave the sources at fixed shares.

    Position ``p`` of an epoch takes the next index of the source that is furthest behind its
    share (``share * (p + 1) - taken``; ties by source name), so with two equal shares the
    sources alternate and any batch of even size holds exactly half of each. Within a source,
    indices come in a random order without replacement; a source that runs out (the smaller
    one, usually) is reshuffled and repeated.

    Args:
        sources: the source of every sample of the dataset (e.g. ``dataset.sources``).
        num_samples: indices per epoch; default ``len(sources)``.
        weights: ``{source: weight}``, normalised to shares; default equal shares. A source
            with weight 0 (or left out of a given mapping) is not sampled.
        seed: the order is a function of ``(seed, epoch)`` only, so a resumed run that calls
            :meth:`set_epoch` replays the same epochs exactly.
    """

    def __init__(
        self,
        sources: Sequence[str],
        num_samples: int | None = None,
        weights: Mapping[str, float] | None = None,
        seed: int = 0,
    ) -> None:
        self.sources = list(sources)
        self.shares = _shares(self.sources, weights)
        self.groups = {
            name: [i for i, s in enumerate(self.sources) if s == name] for name in self.shares
        }
        self.num_samples = len(self.sources) if num_samples is None else int(num_samples)
        if self.num_samples < 1:
            raise ConfigError(f"BalancedSourceSampler: num_samples must be >= 1, got {num_samples}")
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order :meth:`__iter__` yields."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())

    def schedule(self) -> list[str]:
        """The source of each position of an epoch (the same for every epoch)."""
        taken = dict.fromkeys(self.shares, 0)
        order = []
        for position in range(self.num_samples):
            name = max(
                self.shares, key=lambda n: round(self.shares[n] * (position + 1) - taken[n], 9)
            )
            taken[name] += 1
            order.append(name)
        return order

    def indices(self, epoch: int | None = None) -> list[int]:
        """The indices of ``epoch`` (default: the epoch set by :meth:`set_epoch`)."""
        epoch = self.epoch if epoch is None else int(epoch)
        generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch))
        streams: dict[str, list[int]] = {name: [] for name in self.shares}
        out = []
        for name in self.schedule():
            if not streams[name]:
                group = self.groups[name]
                perm = torch.randperm(len(group), generator=generator).tolist()
                streams[name] = [group[i] for i in reversed(perm)]
            out.append(streams[name].pop())
        return out
