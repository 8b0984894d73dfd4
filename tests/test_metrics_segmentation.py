"""Foreground IoU and Dice: dataset-level vs per-image, background, thresholds."""

import math

import pytest
import torch

import moekit.metrics  # noqa: F401  (registers METRICS)
from moekit.registry import METRICS


def masks_to_logits(mask):
    return torch.where(mask.bool(), 10.0, -10.0)


def test_dataset_level_sums_over_images_per_image_averages():
    target = torch.zeros(2, 1, 4, 4)
    pred = torch.zeros(2, 1, 4, 4)
    target[0, 0, :2] = 1  # 8 px
    pred[0, 0, :1] = 1  # 4 px inside: I=4, U=8
    target[1, 0, 0, 0] = 1  # 1 px
    pred[1, 0, 0, :2] = 1  # I=1, U=2
    iou = METRICS.build({"type": "iou"}, num_classes=1)
    dice = METRICS.build({"type": "dice"}, num_classes=1)
    for metric in (iou, dice):
        metric.update(masks_to_logits(pred), target)
    assert iou.compute()[""] == pytest.approx(5 / 10)
    assert iou.compute()["per_image"] == pytest.approx((4 / 8 + 1 / 2) / 2)
    assert dice.compute()[""] == pytest.approx(2 * 5 / (6 + 9))
    assert dice.compute()["per_image"] == pytest.approx((8 / 12 + 2 / 3) / 2)
    assert dice.higher_is_better


def test_per_class_channels_and_images_without_the_class():
    target = torch.zeros(2, 2, 4, 4)
    target[:, 0, :2] = 1
    pred = target.clone()
    pred[0, 1, 0, 0] = 1  # a false positive of class 1 on image 0
    metric = METRICS.build({"type": "iou"}, num_classes=2, class_names=["MA", "HE"])
    metric.update(masks_to_logits(pred), target)
    result = metric.compute()
    assert result["MA"] == 1.0 and result["HE"] == 0.0
    assert result["per_image/HE"] == 0.0  # image 1 has no HE anywhere: skipped
    assert result[""] == 0.5


def test_threshold_on_probabilities():
    logits = torch.full((1, 1, 2, 2), 0.2)  # sigmoid(0.2) = 0.55
    target = torch.ones(1, 1, 2, 2)
    low = METRICS.build({"type": "dice", "threshold": 0.5}, num_classes=1)
    high = METRICS.build({"type": "dice", "threshold": 0.6}, num_classes=1)
    low.update(logits, target)
    high.update(logits, target)
    assert low.compute()[""] == 1.0 and high.compute()[""] == 0.0


def test_class_index_maps_exclude_background():
    target = torch.tensor([[[0, 1], [2, 2]]])
    logits = torch.nn.functional.one_hot(torch.tensor([[[0, 1], [2, 0]]]), 3).permute(0, 3, 1, 2)
    metric = METRICS.build({"type": "iou"}, num_classes=3)
    metric.update(logits.float(), target)
    result = metric.compute()
    assert math.isnan(result["0"])  # background: left out
    assert result["1"] == 1.0 and result["2"] == 0.5
    assert result[""] == 0.75


def test_masked_images_do_not_count():
    target = torch.ones(2, 1, 2, 2)
    pred = torch.stack([torch.ones(1, 2, 2), torch.zeros(1, 2, 2)])
    metric = METRICS.build({"type": "dice"}, num_classes=1)
    metric.update(masks_to_logits(pred), target, mask=torch.tensor([True, False]))
    assert metric.compute()[""] == 1.0


def test_a_probability_at_the_threshold_is_negative_in_metrics_and_overlays():
    from moekit.analysis.predictions import dense_map
    from moekit.metrics.base import DEFAULT_THRESHOLD, above_threshold
    from moekit.types import Task

    assert DEFAULT_THRESHOLD == 0.5
    logits = torch.tensor([[[[0.0, 0.01], [-0.01, 3.0]]]])  # p = 0.5, >0.5, <0.5, 0.95
    target = torch.ones(1, 1, 2, 2)
    dice = METRICS.build({"type": "dice"}, num_classes=1)
    dice.update(logits, target)
    assert dice.compute()[""] == pytest.approx(2 * 2 / (2 + 4))  # 2 of 4 pixels predicted
    task = Task.from_config("OD", {"kind": "segmentation", "num_classes": 1})
    overlay = dense_map(task, logits[0], is_target=False)
    assert overlay.tolist() == [[0, 1], [0, 1]]
    assert above_threshold(torch.sigmoid(logits), 0.5).long()[0, 0].tolist() == overlay.tolist()
    assert dense_map(task, logits[0], is_target=False, threshold=0.9).tolist() == [[0, 0], [0, 1]]


def test_eval_threshold_reaches_every_thresholded_metric_without_its_own():
    from moekit.engine.evaluation import MetricTracker, build_metrics
    from moekit.types import Task

    task = Task.from_config(
        "OD",
        {
            "kind": "segmentation",
            "num_classes": 1,
            "metrics": [
                "iou",
                "dice",
                "recall",
                "accuracy",
                {"type": "dice", "threshold": 0.3, "name": "d30"},
            ],
        },
    )
    metrics = build_metrics(task, threshold=0.7)
    assert {n: m.threshold for n, m in metrics.items()} == {
        "iou": 0.7,
        "dice": 0.7,
        "recall": 0.7,
        "accuracy": 0.7,
        "d30": 0.3,  # its own threshold wins
    }
    assert {m.threshold for m in build_metrics(task).values()} == {0.5, 0.3}
    grading = Task.from_config("rg", {"kind": "multiclass", "num_classes": 5, "metrics": ["kappa"]})
    assert set(build_metrics(grading, threshold=0.7)) == {"kappa"}  # takes no threshold: untouched
    tracker = MetricTracker({"OD": task}, threshold=0.7)
    assert tracker.metrics["OD"]["dice"].threshold == 0.7


def test_eval_threshold_key_default_and_validation():
    from moekit.errors import ConfigError
    from moekit.sections import settings

    assert settings({}, "eval")["threshold"] == 0.5
    assert settings({"eval": {"threshold": 0.35}}, "eval")["threshold"] == 0.35
    for bad in (1.5, -0.1, "0.5", True):
        with pytest.raises(ConfigError, match=r"eval\.threshold"):
            settings({"eval": {"threshold": bad}}, "eval")
