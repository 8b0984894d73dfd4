"""RMSE, MAE and angular error against numpy, pooled over a split however it is batched."""

import numpy as np
import pytest
import torch

import moekit.metrics  # noqa: F401  (registers METRICS)
from moekit.registry import METRICS


def pooled(metric_type, batches, **options):
    metric = METRICS.build({"type": metric_type, **options}, num_classes=1)
    for preds, targets, mask in batches:
        metric.update(preds, targets, mask)
    return metric.compute()[""]


def test_rmse_and_mae_match_numpy_over_the_labelled_samples_for_any_batching():
    rng = np.random.default_rng(0)
    preds = rng.normal(size=(6, 1, 5, 4)).astype(np.float32)
    targets = rng.normal(size=(6, 1, 5, 4)).astype(np.float32)
    mask = np.array([True, True, False, True, False, True])
    error = preds[mask] - targets[mask]
    expected = {"rmse": np.sqrt((error**2).mean()), "mae": np.abs(error).mean()}
    p, t, m = torch.from_numpy(preds), torch.from_numpy(targets), torch.from_numpy(mask)
    for metric_type, value in expected.items():
        whole = pooled(metric_type, [(p, t, m)])
        split = pooled(metric_type, [(p[:1], t[:1], m[:1]), (p[1:], t[1:], m[1:])])
        assert whole == pytest.approx(value, rel=1e-5)
        assert split == pytest.approx(value, rel=1e-5)
        assert not METRICS.get(metric_type).higher_is_better


def test_one_channel_targets_without_the_channel_dimension():
    preds = torch.zeros(2, 1, 3, 3)
    targets = torch.full((2, 3, 3), 2.0)
    assert pooled("rmse", [(preds, targets, None)]) == pytest.approx(2.0)


def test_angular_error_in_degrees_skips_zero_vector_targets():
    targets = torch.zeros(1, 3, 1, 3)
    targets[0, 2, 0, 0] = 1.0  # +z
    targets[0, 0, 0, 1] = 1.0  # +x
    preds = torch.zeros(1, 3, 1, 3)
    preds[0, 2, 0, 0] = 5.0  # same direction, other length: 0 degrees
    preds[0, 2, 0, 1] = 1.0  # +z against +x: 90 degrees
    preds[0, 1, 0, 2] = 1.0  # the target of pixel 2 is the zero vector: invalid
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(2, 3))
    expected = np.degrees(np.arccos(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))
    assert pooled("angular_error", [(preds, targets, None)]) == pytest.approx(45.0)
    random = pooled(
        "angular_error",
        [(torch.tensor(a).view(1, 3, 1, 1), torch.tensor(b).view(1, 3, 1, 1), None)],
    )
    assert random == pytest.approx(expected, rel=1e-5)
