"""The ODIR CPU config: it checks, builds with class-balanced counts from the replica's training
labels (``counts: auto``), and trains an epoch end to end with the ranking metrics and the
challenge score."""

import csv

import pandas as pd
import pytest

from moekit import config
from moekit.cli import main
from moekit.data.replicas.odir import make_odir_replica
from moekit.engine.config_check import check_config
from moekit.engine.experiment import build_experiment

CONFIG = "configs/odir/replica_resnet18.yaml"
COUNTS = {"train": 32, "val": 8, "offsite_test": 8, "onsite_test": 2}


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    return make_odir_replica(tmp_path_factory.mktemp("odir") / "replica", COUNTS, size=48)


def overrides(root, *extra):
    splits = ("train", "val", "test")
    return [*(f"data.{s}.root={root}" for s in splits), "data.batch_size=8", *extra]


def test_config_builds_with_counts_from_the_training_labels(replica):
    cfg = config.load(CONFIG, overrides(replica))
    check_config(cfg)
    experiment = build_experiment(cfg, splits=["val"])  # the train split is read for counts
    with open(replica / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    counts = [sum(int(r[c]) for r in rows) for c in "DGA"]
    (loss,) = experiment.objective.losses["diagnosis"]
    assert loss.counts == counts
    raw = [(1 - 0.999) / (1 - 0.999**n) for n in counts]
    assert loss.pos_weight.tolist() == pytest.approx([3 * w / sum(raw) for w in raw], rel=1e-6)
    assert list(experiment.datasets) == ["val"]


@pytest.mark.slow  # trains one epoch
def test_config_trains_an_epoch_on_the_replica(replica, tmp_path):
    args = overrides(replica, "train.epochs=1", f"output_dir={tmp_path}", "name=odir")
    assert main(["train", CONFIG, "--set", *args]) == 0
    (run,) = tmp_path.glob("odir-*")
    metrics = pd.read_csv(run / "metrics.csv")
    for column in ("diagnosis/roc_auc/G", "diagnosis/average_precision", "diagnosis/odir_score"):
        assert column in metrics.columns
    assert set(metrics["split"]) >= {"train", "val"}
