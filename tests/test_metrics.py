"""Classification metrics, kappa, multi-task delta, and additivity of metric statistics."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moekit.metrics  # noqa: F401  (registers METRICS)
from moekit.errors import ConfigError
from moekit.registry import METRICS


def build(name, num_classes, **kwargs):
    return METRICS.build({"type": name, **kwargs}, num_classes=num_classes)


def logits_for(labels, num_classes):
    return torch.nn.functional.one_hot(torch.as_tensor(labels), num_classes).float() * 5


def test_accuracy_multiclass_with_mask():
    metric = build("accuracy", 3)
    preds = logits_for([0, 1, 2, 2], 3)
    metric.update(preds, torch.tensor([0, 1, 1, 0]), mask=torch.tensor([True, True, True, False]))
    assert metric.compute() == {"": pytest.approx(2 / 3)}
    assert build("accuracy", 3).higher_is_better


def test_accuracy_multilabel_labelwise_and_subset():
    preds = torch.tensor([[5.0, -5.0], [5.0, 5.0]])
    targets = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    labelwise, subset = build("accuracy", 2), build("accuracy", 2, subset=True)
    labelwise.update(preds, targets)
    subset.update(preds, targets)
    assert labelwise.compute()[""] == pytest.approx(3 / 4)
    assert subset.compute()[""] == pytest.approx(1 / 2)


def test_per_class_precision_recall_f1():
    targets = torch.tensor([0, 0, 1, 1, 2, 2])
    preds = logits_for([0, 1, 1, 1, 0, 2], 3)
    values = {}
    for name in ("precision", "recall", "f1"):
        metric = METRICS.build({"type": name}, num_classes=3, class_names=["a", "b", "c"])
        metric.update(preds, targets)
        values[name] = metric.compute()
    # class a: tp 1 fp 1 fn 1; b: tp 2 fp 1 fn 0; c: tp 1 fp 0 fn 1
    assert [values["precision"][c] for c in "abc"] == pytest.approx([1 / 2, 2 / 3, 1.0])
    assert [values["recall"][c] for c in "abc"] == pytest.approx([1 / 2, 1.0, 1 / 2])
    f1 = [2 / 4, 4 / 5, 2 / 3]
    assert [values["f1"][c] for c in "abc"] == pytest.approx(f1)
    assert values["f1"][""] == pytest.approx(sum(f1) / 3)
    micro = build("f1", 3, average="micro")
    micro.update(preds, targets)
    assert micro.compute()[""] == pytest.approx(4 / 6)  # micro F1 = accuracy for multiclass


def reference_macro(y, p, c, kind, zero_division=0.0):
    """scikit-learn's macro average over the labels present in y or p, in plain Python."""
    scores = []
    for k in sorted(set(y) | set(p)):
        tp = sum(1 for a, b in zip(y, p, strict=True) if a == k and b == k)
        fp = sum(1 for a, b in zip(y, p, strict=True) if a != k and b == k)
        fn = sum(1 for a, b in zip(y, p, strict=True) if a == k and b != k)
        num, den = {
            "precision": (tp, tp + fp),
            "recall": (tp, tp + fn),
            "f1": (2 * tp, 2 * tp + fp + fn),
        }[kind]
        if den:
            scores.append(num / den)
        elif zero_division is not None:
            scores.append(zero_division)
    return sum(scores) / len(scores) if scores else math.nan


@settings(max_examples=60, deadline=None)
@given(
    pairs=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=30),
    kind=st.sampled_from(["precision", "recall", "f1"]),
    zero_division=st.sampled_from([0.0, None]),
)
def test_macro_scores_match_a_plain_computation(pairs, kind, zero_division):
    y, p = [a for a, _ in pairs], [b for _, b in pairs]
    metric = build(kind, 4, zero_division=zero_division)
    metric.update(logits_for(p, 4), torch.tensor(y))
    expected = reference_macro(y, p, 4, kind, zero_division)
    got = metric.compute()[""]
    assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected)


def test_a_class_never_predicted_scores_zero_precision():
    metric = build("precision", 2)
    metric.update(logits_for([0, 0], 2), torch.tensor([0, 1]))
    result = metric.compute()
    assert result["1"] == 0.0 and result[""] == pytest.approx((1 / 2 + 0) / 2)


def test_macro_skips_undefined_classes():
    metric = build("f1", 2)
    metric.update(torch.tensor([[5.0, -5.0]]), torch.tensor([[1.0, 0.0]]))
    result = metric.compute()
    assert result["0"] == 1.0 and math.isnan(result["1"])
    assert result[""] == 1.0
    empty = build("recall", 2)
    assert math.isnan(empty.compute()[""])


def reference_kappa(y, p, c):
    observed = [[0.0] * c for _ in range(c)]
    for a, b in zip(y, p):
        observed[a][b] += 1
    n = len(y)
    rows = [sum(r) for r in observed]
    cols = [sum(observed[i][j] for i in range(c)) for j in range(c)]
    num = sum((i - j) ** 2 * observed[i][j] for i in range(c) for j in range(c))
    den = sum((i - j) ** 2 * rows[i] * cols[j] / n for i in range(c) for j in range(c))
    return 1 - num / den


def test_quadratic_kappa_matches_reference():
    y = [0, 1, 2, 3, 4, 2, 1, 0, 4, 3]
    p = [0, 2, 2, 3, 3, 1, 1, 0, 4, 4]
    metric = build("kappa", 5)
    metric.update(logits_for(p, 5), torch.tensor(y))
    assert metric.compute()[""] == pytest.approx(reference_kappa(y, p, 5))
    perfect = build("kappa", 3)
    perfect.update(logits_for([0, 1, 2], 3), torch.tensor([0, 1, 2]))
    assert perfect.compute()[""] == pytest.approx(1.0)


def test_mtl_delta_signs_and_variants():
    values = {"seg/miou": 0.55, "depth/rmse": 0.45, "seg/f1": 0.70}
    higher = {"seg/miou": True, "depth/rmse": False, "seg/f1": True}
    baselines = {"seg/miou": 0.50, "depth/rmse": 0.50, "seg/f1": 0.70}
    pooled = METRICS.build({"type": "mtl_delta", "baselines": baselines})(values, higher)
    assert pooled["seg/miou"] == pytest.approx(10.0)
    assert pooled["depth/rmse"] == pytest.approx(10.0)  # lower is better: 0.45 < 0.50
    assert pooled["pooled"] == pytest.approx(20.0 / 3)
    by_task = METRICS.build({"type": "mtl_delta", "baselines": baselines, "variant": "task_mean"})
    assert by_task(values, higher)["task_mean"] == pytest.approx((5.0 + 10.0) / 2)
    with pytest.raises(ConfigError, match="'seg' must be 'task/metric'"):
        METRICS.build({"type": "mtl_delta", "baselines": {"seg": 0.5}})
    with pytest.raises(ConfigError, match="not a task metric"):
        METRICS.build({"type": "mtl_delta", "baselines": {"seg/x": 0.5}})(values, higher)


@given(
    st.lists(st.integers(0, 3), min_size=2, max_size=12),
    st.lists(st.integers(0, 3), min_size=12, max_size=12),
    st.integers(1, 11),
)
def test_statistics_add_up_under_any_batching(labels, predicted, cut):
    """The score of a split does not depend on how it is batched (or sharded)."""
    n = len(labels)
    cut = min(cut, n - 1)
    preds, targets = logits_for(predicted[:n], 4), torch.tensor(labels)
    for name in ("accuracy", "f1", "kappa", "precision"):
        whole, parts = build(name, 4), build(name, 4)
        whole.update(preds, targets)
        parts.update(preds[:cut], targets[:cut])
        parts.accumulate(parts.sample_stats(preds[cut:], targets[cut:]))
        a, b = whole.compute(), parts.compute()
        assert a.keys() == b.keys()
        for key in a:
            assert (math.isnan(a[key]) and math.isnan(b[key])) or a[key] == pytest.approx(b[key])
