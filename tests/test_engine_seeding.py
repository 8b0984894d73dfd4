"""One seed for everything: RNGs, shuffle order per epoch, generated data, determinism."""

import random

import numpy as np
import pytest
import torch

from moekit.data.synthetic_tensors import SyntheticTensors
from moekit.engine.data import EpochSampler
from moekit.engine.launch import make_accelerator
from moekit.engine.seeding import seed_everything
from moekit.errors import ConfigError
from moekit.rng import derived_seed
from moekit.sections import TRAIN


def draws():
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_seed_everything_seeds_python_numpy_torch():
    seed_everything(3)
    first = draws()
    seed_everything(3)
    assert draws() == first


def test_deterministic_flag():
    try:
        seed_everything(0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_shuffle_is_a_function_of_seed_and_epoch():
    sampler = EpochSampler(20, seed=1)
    sampler.set_epoch(2)
    order = list(sampler)
    assert sorted(order) == list(range(20))
    sampler.set_epoch(3)
    assert list(sampler) != order
    again = EpochSampler(20, seed=1)
    again.set_epoch(2)
    assert list(again) == order
    assert derived_seed(1, 2) == derived_seed(1, 2) != derived_seed(1, 3)


def test_synthetic_tensors_are_reproducible_and_partially_labelled():
    a = SyntheticTensors(num_samples=12, label_fraction={"seg": 0.5}, seed=4)
    b = SyntheticTensors(num_samples=12, label_fraction={"seg": 0.5}, seed=4)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert int(a.labelled["seg"].sum()) == 6 and bool(a.labelled["cls"].all())
    sample = a[int((~a.labelled["seg"]).nonzero()[0])]
    assert sample["has_target"] == {"cls": True, "seg": False}
    assert not sample["targets"]["seg"].any()
    val = SyntheticTensors(split="val", num_samples=12, seed=4)
    assert not torch.equal(a.inputs, val.inputs)
    with pytest.raises(ConfigError, match="unknown task 'depth'"):
        SyntheticTensors(tasks=["cls", "depth"])


def test_tensorboard_needs_the_package():
    from accelerate.utils import is_tensorboard_available

    if is_tensorboard_available():
        pytest.skip("tensorboard is installed")
    with pytest.raises(ConfigError, match="tensorboard is not installed"):
        make_accelerator({**TRAIN.defaults(), "log_with": "tensorboard"})
