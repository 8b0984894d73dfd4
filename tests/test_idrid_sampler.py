"""BalancedSourceSampler: even mixing of grading and segmentation images inside batches."""

from collections import Counter

import pytest
import torch
from torch.utils.data import BatchSampler

from moekit.data.samplers import BalancedSourceSampler, source_weights
from moekit.errors import ConfigError

SOURCES = ["grading"] * 40 + ["segmentation"] * 6


def test_every_even_batch_is_half_and_half():
    sampler = BalancedSourceSampler(SOURCES, seed=0)
    assert len(sampler) == len(SOURCES)
    for batch in BatchSampler(sampler, batch_size=8, drop_last=True):
        counts = Counter(SOURCES[i] for i in batch)
        assert counts == {"grading": 4, "segmentation": 4}


def test_small_source_is_cycled_without_replacement_within_a_pass():
    indices = BalancedSourceSampler(SOURCES, seed=1).indices()
    seg = [i for i in indices if SOURCES[i] == "segmentation"]
    assert len(seg) == 23
    for start in range(0, 18, 6):  # each consecutive pass over the 6 images is a permutation
        assert sorted(seg[start : start + 6]) == list(range(40, 46))
    grading = [i for i in indices if SOURCES[i] == "grading"]
    assert len(grading) == len(set(grading)) == 23


def test_order_is_a_function_of_seed_and_epoch():
    a, b = BalancedSourceSampler(SOURCES, seed=3), BalancedSourceSampler(SOURCES, seed=3)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    b.set_epoch(1)
    assert list(a) == list(b) == a.indices(epoch=1)
    assert list(BalancedSourceSampler(SOURCES, seed=4)) != b.indices(epoch=0)


def test_weights_and_num_samples():
    sampler = BalancedSourceSampler(
        SOURCES, num_samples=90, weights={"grading": 2, "segmentation": 1}
    )
    counts = Counter(SOURCES[i] for i in sampler)
    assert counts == {"grading": 60, "segmentation": 30}
    only = BalancedSourceSampler(SOURCES, weights={"segmentation": 1.0}, num_samples=12)
    assert all(SOURCES[i] == "segmentation" for i in only)


def test_bad_weights_are_config_errors():
    with pytest.raises(ConfigError, match="unknown sources"):
        BalancedSourceSampler(SOURCES, weights={"grading": 1, "segmentaton": 1})
    with pytest.raises(ConfigError, match="positive sum"):
        BalancedSourceSampler(SOURCES, weights={"grading": 0})
    with pytest.raises(ConfigError, match="num_samples"):
        BalancedSourceSampler(SOURCES, num_samples=0)


def test_source_weights_give_each_source_an_equal_share():
    weights = source_weights(SOURCES)
    assert weights.sum().item() == pytest.approx(1.0)
    seg = torch.tensor([s == "segmentation" for s in SOURCES])
    assert weights[seg].sum().item() == pytest.approx(0.5)
    assert weights[~seg].sum().item() == pytest.approx(0.5)
