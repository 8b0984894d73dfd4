"""Per-class decision thresholds: the F1 family and the challenge score at a threshold per
class, ``evaluate_loop`` tuning them on a split, and ``eval.thresholds: tune`` end to end —
tuned on validation at every epoch, kept in the checkpoints, applied unchanged to test."""

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import moekit.projects  # noqa: F401  (registers odir_score, transfer_classifier)
from moekit.cli import main
from moekit.data.replicas.odir import make_odir_replica
from moekit.engine.evaluation import evaluate_loop
from moekit.metrics.thresholds import tune_thresholds
from moekit.registry import METRICS
from moekit.types import Batch, ModelOutput, Task

CLASSES = ["D", "G", "A"]


def scores(seed, n=40):
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, 3, generator=generator) < 0.4).float()
    logits = 2 * labels - 1 + torch.randn(n, 3, generator=generator) * 1.5
    return logits, labels


@given(st.integers(0, 10_000), st.lists(st.floats(0.01, 0.99), min_size=3, max_size=3))
def test_a_threshold_per_class_is_each_class_at_its_own(seed, thresholds):
    logits, labels = scores(seed)
    for name in ("f1", "precision", "recall"):
        metric = METRICS.build({"type": name, "threshold": thresholds}, num_classes=3)
        metric.update(logits, labels)
        values = metric.compute()
        for c, t in enumerate(thresholds):
            single = METRICS.build({"type": name, "threshold": t}, num_classes=1)
            single.update(logits[:, c : c + 1], labels[:, c : c + 1])
            assert values[str(c)] == pytest.approx(single.compute()[""], abs=1e-12)


def test_the_challenge_score_thresholds_before_flattening():
    logits, labels = scores(3)
    thresholds = [0.2, 0.5, 0.8]
    metric = METRICS.build({"type": "odir_score", "threshold": thresholds}, num_classes=3)
    metric.update(logits, labels)
    decided = torch.sigmoid(logits) > torch.tensor(thresholds, dtype=torch.float64)
    accuracy = float((decided == (labels > 0.5)).double().mean())
    assert metric.compute()["f1"] == pytest.approx(accuracy, abs=1e-12)


def test_a_wrong_number_of_thresholds_is_an_error():
    with pytest.raises(ValueError, match="2 per-class values for 3 classes"):
        METRICS.build({"type": "f1", "threshold": [0.3, 0.4]}, num_classes=3)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        METRICS.build({"type": "f1", "threshold": [0.3, 0.4, 1.0]}, num_classes=3)


class Fixed(torch.nn.Module):
    """Returns the logits stored for the batch's samples."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, inputs, task_mask=None):
        return ModelOutput({"diagnosis": self.logits[inputs.long().flatten()]}, [])


class Losses:
    def sample_losses(self, preds, batch):
        return {"diagnosis": torch.zeros(preds["diagnosis"].shape[0])}


def batches(labels, size=7):
    for start in range(0, labels.shape[0], size):
        index = torch.arange(start, min(start + size, labels.shape[0]))
        labelled = index % 5 != 0  # some samples carry no label
        yield Batch(index.float(), {"diagnosis": labels[index]}, {"diagnosis": labelled})


def test_evaluate_loop_tunes_on_the_split_and_applies_given_thresholds():
    logits, labels = scores(11, n=60)
    spec = {
        "kind": "multilabel",
        "num_classes": 3,
        "class_names": CLASSES,
        "loss": ["bce"],
        "metrics": ["f1", "roc_auc"],
    }
    tasks = {"diagnosis": Task.from_config("diagnosis", spec)}
    model = Fixed(logits)
    plain = evaluate_loop(model, Losses(), batches(labels), tasks)
    tuned = evaluate_loop(model, Losses(), batches(labels), tasks, tune=True)
    labelled = torch.arange(60) % 5 != 0
    expected = tune_thresholds(torch.sigmoid(logits[labelled]), labels[labelled])
    found = [tuned[f"diagnosis/threshold/{c}"] for c in CLASSES]
    assert found == expected.tolist()
    assert tuned["diagnosis/f1"] >= plain["diagnosis/f1"]
    assert tuned["diagnosis/roc_auc"] == plain["diagnosis/roc_auc"]  # not thresholded
    assert "diagnosis/threshold/D" not in plain
    applied = evaluate_loop(
        model, Losses(), batches(labels), tasks, thresholds={"diagnosis": found}
    )
    assert applied["diagnosis/f1"] == pytest.approx(tuned["diagnosis/f1"], abs=1e-12)
    assert [applied[f"diagnosis/threshold/{c}"] for c in CLASSES] == found


@pytest.mark.slow  # trains two epochs
def test_thresholds_tuned_on_val_are_kept_and_applied_to_test(tmp_path, capsys):
    counts = {"train": 16, "val": 8, "offsite_test": 8, "onsite_test": 1}
    root = make_odir_replica(tmp_path / "replica", counts, size=40)
    run = tmp_path / "run"
    overrides = [
        *(f"data.{s}.root={root}" for s in ("train", "val", "test")),
        *(f"data.{s}.image_size=[32, 32]" for s in ("train", "val", "test")),
        "data.batch_size=8",
        "train.epochs=2",
        "train.curves=false",
        "eval.thresholds=tune",
    ]
    args = ["train", "configs/odir/replica_resnet18.yaml", "--run-dir", run, "--set", *overrides]
    assert main([str(a) for a in args]) == 0
    state = json.loads((run / "checkpoints/best/trainer_state.json").read_text())
    kept = state["thresholds"]["diagnosis"]
    summary = json.loads((run / "summary.json").read_text())
    best_row = summary["best"]["metrics"]
    assert kept == [best_row[f"val/diagnosis/threshold/{c}"] for c in CLASSES]
    assert main(["eval", str(run), "--split", "test"]) == 0
    evaluated = json.loads((run / "eval/test-best.json").read_text())["metrics"]
    assert [evaluated[f"test/diagnosis/threshold/{c}"] for c in CLASSES] == kept
    assert main(["eval", str(run), "--split", "val"]) == 0  # same thresholds, same values
    again = json.loads((run / "eval/val-best.json").read_text())["metrics"]
    assert again["val/diagnosis/f1"] == pytest.approx(best_row["val/diagnosis/f1"], abs=1e-9)
