"""The ODIR study's imbalance losses against plain loops: multi-label focal (α, γ), class-balanced
BCE and its ``counts: auto`` resolution from a dataset's labels."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import moekit.losses  # noqa: F401  (registers TASK_LOSSES)
from moekit.errors import ConfigError
from moekit.losses.task_losses import resolve_auto_counts
from moekit.registry import TASK_LOSSES

STUDY_COUNTS = (517, 163, 142)
"""Positives per class (D, G, A) among the ODIR study's 800 training images."""


def loop_bce(x, y, pos_weight=1.0):
    p = 1 / (1 + math.exp(-x))
    return -(pos_weight * y * math.log(p) + (1 - y) * math.log(1 - p))


def loop_cb_weights(counts, beta):
    raw = [(1 - beta) / (1 - beta**n) for n in counts]
    return [len(counts) * w / sum(raw) for w in raw]


@given(
    st.lists(st.floats(-6, 6), min_size=6, max_size=6),
    st.lists(st.integers(0, 1), min_size=6, max_size=6),
    st.sampled_from([(1.0, 0.5), (2.0, 0.25), (0.0, None)]),
)
def test_multilabel_focal_is_alpha_t_times_modulated_bce(logits, labels, params):
    gamma, alpha = params
    x = torch.tensor(logits, dtype=torch.float64).view(2, 3).float()
    y = torch.tensor(labels).view(2, 3).float()
    loss = TASK_LOSSES.build({"type": "focal", "gamma": gamma, "alpha": alpha})(x, y)
    for i in range(2):
        terms = []
        for c in range(3):
            xi, yi = float(x[i, c]), float(y[i, c])
            p = 1 / (1 + math.exp(-xi))
            p_t = p if yi else 1 - p
            alpha_t = 1.0 if alpha is None else (alpha if yi else 1 - alpha)
            terms.append(alpha_t * (1 - p_t) ** gamma * loop_bce(xi, yi))
        assert float(loss[i]) == pytest.approx(sum(terms) / 3, rel=1e-4, abs=1e-6)


def test_class_balanced_weights_and_loss_match_the_formula():
    weights = loop_cb_weights(STUDY_COUNTS, 0.999)
    loss = TASK_LOSSES.build({"type": "class_balanced_bce", "counts": list(STUDY_COUNTS)})
    assert loss.pos_weight.tolist() == pytest.approx(weights, rel=1e-6)
    assert sum(weights) == pytest.approx(3.0)
    assert weights[0] < weights[2] < weights[1] or weights[0] < weights[1] < weights[2]
    x = torch.tensor([[0.3, -1.2, 2.0], [-0.7, 0.1, -2.5]])
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    out = loss(x, y)
    for i in range(2):
        ref = [loop_bce(float(x[i, c]), float(y[i, c]), weights[c]) for c in range(3)]
        assert float(out[i]) == pytest.approx(sum(ref) / 3, rel=1e-5)


def test_equal_counts_make_class_balanced_bce_plain_bce():
    """What the ODIR study's counts after VAE balancing did: every weight 1."""
    loss = TASK_LOSSES.build({"type": "class_balanced_bce", "counts": [500, 500, 500]})
    assert loss.pos_weight.tolist() == pytest.approx([1.0, 1.0, 1.0])


class LabelledDataset:
    def __init__(self):
        self.calls = 0

    def label_counts(self, task):
        self.calls += 1
        assert task == "diagnosis"
        return list(STUDY_COUNTS)


def test_counts_auto_resolves_from_the_training_dataset_only_when_asked():
    dataset = LabelledDataset()
    plain = resolve_auto_counts({"type": "bce"}, "diagnosis", lambda: dataset)
    assert plain == {"type": "bce"} and dataset.calls == 0
    spec = {"type": "class_balanced_bce", "counts": "auto", "beta": 0.99}
    resolved = resolve_auto_counts(spec, "diagnosis", lambda: dataset)
    assert resolved == {"type": "class_balanced_bce", "counts": [517.0, 163.0, 142.0], "beta": 0.99}
    assert spec["counts"] == "auto"  # the config is not modified
    with pytest.raises(ConfigError, match="needs a training dataset"):
        resolve_auto_counts(spec, "diagnosis", None)
    with pytest.raises(ConfigError, match="label_counts"):
        resolve_auto_counts(spec, "diagnosis", lambda: object())
    with pytest.raises(ConfigError, match="resolved from the training dataset"):
        TASK_LOSSES.build(spec)
    with pytest.raises(ConfigError, match="counts"):
        TASK_LOSSES.build({"type": "class_balanced_bce", "counts": "many"})
