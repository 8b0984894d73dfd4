"""Collation of multi-modal samples: any pattern of present modalities and labels."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moekit.data.collate import collate_samples
from moekit.types import Batch

SHAPES = {"fundus": (3, 4, 6), "oct": (5, 3, 2), "text": (7,)}
TASKS = ("grade", "mask")


def _sample(index, present, labelled, declare=True):
    inputs = {
        name: torch.full(shape, float(index + 1 + 10 * m))
        for m, (name, shape) in enumerate(SHAPES.items())
        if present[m]
    }
    sample = {
        "inputs": inputs,
        "targets": {"grade": torch.tensor(index), "mask": torch.full((1, 4, 6), float(index))},
        "has_target": dict(zip(TASKS, labelled)),
        "meta": {"id": f"s{index}"},
    }
    if declare:
        sample["modalities"] = SHAPES
    return sample


patterns = st.lists(
    st.tuples(st.tuples(*[st.booleans()] * len(SHAPES)), st.tuples(*[st.booleans()] * len(TASKS))),
    min_size=1,
    max_size=6,
)


@given(patterns)
def test_any_pattern_collates_with_matching_masks(rows):
    samples = [_sample(i, present, labelled) for i, (present, labelled) in enumerate(rows)]
    batch = collate_samples(samples)
    assert batch.modalities == tuple(SHAPES)
    assert batch.present.dtype == torch.bool
    assert batch.present.tolist() == [list(present) for present, _ in rows]
    for task_index, task in enumerate(TASKS):
        assert batch.has_target[task].tolist() == [labelled[task_index] for _, labelled in rows]
    for m, (name, shape) in enumerate(SHAPES.items()):
        assert batch.inputs[name].shape == (len(rows), *shape)
        for b, (present, _) in enumerate(rows):
            expected = float(b + 1 + 10 * m) if present[m] else 0.0
            assert bool((batch.inputs[name][b] == expected).all())
    assert batch.targets["grade"].tolist() == list(range(len(rows)))
    assert batch.meta["id"] == [f"s{i}" for i in range(len(rows))]
    assert batch.batch_size == len(rows)


@given(patterns)
def test_without_a_declaration_columns_are_the_modalities_seen(rows):
    samples = [
        _sample(i, present, labelled, declare=False) for i, (present, labelled) in enumerate(rows)
    ]
    seen = [n for m, n in enumerate(SHAPES) if any(p[m] for p, _ in rows)]
    if not seen:
        return
    batch = collate_samples(samples)
    assert sorted(batch.modalities) == sorted(seen)
    for name in batch.modalities:
        m = list(SHAPES).index(name)
        column = batch.modalities.index(name)
        assert batch.present[:, column].tolist() == [p[m] for p, _ in rows]
        assert batch.modality_present(name).tolist() == [p[m] for p, _ in rows]


def test_single_tensor_samples_are_unchanged():
    samples = [
        {
            "inputs": torch.full((3, 2, 2), float(i)),
            "targets": {"t": torch.tensor(i)},
            "has_target": {"t": i != 1},
        }
        for i in range(3)
    ]
    batch = collate_samples(samples)
    assert batch.present is None and batch.modalities == ()
    assert batch.inputs.shape == (3, 3, 2, 2) and batch.has_target["t"].tolist() == [1, 0, 1]


def test_contract_violations_are_value_errors():
    good = _sample(0, (True, True, True), (True, True))
    wrong_shape = _sample(1, (True, False, False), (True, True))
    wrong_shape["inputs"]["fundus"] = torch.zeros(3, 4, 5)
    with pytest.raises(ValueError, match=r"modality 'fundus' of sample 1 has shape \[3, 4, 5\]"):
        collate_samples([good, wrong_shape])
    undeclared = _sample(1, (True, False, False), (True, True))
    undeclared["inputs"]["audio"] = torch.zeros(2)
    with pytest.raises(ValueError, match="modality 'audio'"):
        collate_samples([good, undeclared])
    fewer_tasks = _sample(1, (True, True, True), (True, True))
    del fewer_tasks["targets"]["mask"]
    with pytest.raises(ValueError, match="sample 1 has targets for"):
        collate_samples([good, fewer_tasks])
    tensor = {"inputs": torch.zeros(3, 4, 6), "targets": good["targets"], "has_target": {}}
    with pytest.raises(ValueError, match="mix tensor inputs"):
        collate_samples([good, tensor])


def test_batch_checks_and_fills_present():
    inputs = {"a": torch.zeros(2, 3), "b": torch.zeros(2, 1)}
    assert Batch(inputs, {}, {}).present.tolist() == [[True, True], [True, True]]
    with pytest.raises(ValueError, match=r"Batch.present: expected bool\[2, 2\]"):
        Batch(inputs, {}, {}, present=torch.ones(2, 3, dtype=torch.bool))
    batch = Batch(inputs, {}, {}, present=torch.tensor([[True, False], [True, True]]))
    assert batch.modality_present("b").tolist() == [False, True]
    with pytest.raises(KeyError, match="modalities: \\['a', 'b'\\]"):
        batch.modality_present("c")
    assert batch.to("cpu").present.tolist() == batch.present.tolist()
