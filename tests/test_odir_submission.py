"""The ODIR study's submission file: the template's ids in order with 0/1 decisions at the run's
(tuned) thresholds, written by ``moekit predict --submission``; one-line errors."""

import json

import pandas as pd
import pytest

from moekit.cli import main
from moekit.data.replicas.odir import make_odir_replica
from moekit.errors import DataError
from moekit.projects.odir.submission import read_template, submission_table


def test_template_ids_in_order_and_errors(tmp_path):
    path = tmp_path / "template.csv"
    path.write_text("id\n913_right.jpg\n12_left.jpg\n")
    assert read_template(path) == ["913_right.jpg", "12_left.jpg"]
    path.write_text("image\n913_right.jpg\n")
    with pytest.raises(DataError, match="no 'id' column"):
        read_template(path)
    path.write_text("id\n913_right.jpg\n913_right.jpg\n")
    with pytest.raises(DataError, match="listed twice"):
        read_template(path)
    with pytest.raises(DataError, match="not found"):
        read_template(tmp_path / "missing.csv")


def test_submission_follows_the_template_and_matches_file_stems():
    decisions = {"12_left": [0, 1, 0], "913_right.jpg": [1, 0, 1]}
    table = submission_table(["913_right.jpg", "12_left.jpg"], decisions)
    assert table.values.tolist() == [["913_right.jpg", 1, 0, 1], ["12_left.jpg", 0, 1, 0]]
    with pytest.raises(DataError, match=r"no prediction for the template's id '7_left\.jpg'"):
        submission_table(["7_left.jpg"], decisions)


@pytest.mark.slow  # trains an epoch
def test_predict_writes_the_submission_at_the_tuned_thresholds(tmp_path):
    counts = {"train": 16, "val": 8, "offsite_test": 4, "onsite_test": 5}
    root = make_odir_replica(tmp_path / "replica", counts, size=40)
    run = tmp_path / "run"
    overrides = [
        *(f"data.{s}.root={root}" for s in ("train", "val", "test")),
        *(f"data.{s}.image_size=[32, 32]" for s in ("train", "val", "test")),
        "train.epochs=1",
        "train.curves=false",
        "eval.thresholds=tune",
    ]
    config = "configs/odir/replica_resnet18.yaml"
    assert main(["train", config, "--run-dir", str(run), "--set", *overrides]) == 0
    state = json.loads((run / "checkpoints/best/trainer_state.json").read_text())
    tuned = state["thresholds"]["diagnosis"]
    images = root / "images" / "onsite_test"
    file = tmp_path / "submission.csv"
    args = ["predict", str(run), str(images), "--out", str(tmp_path / "out"), "--no-overlays"]
    assert main([*args, "--submission", str(file)]) == 0
    submission = pd.read_csv(file)
    template = pd.read_csv(root / "onsite_test_submission.csv")
    assert list(submission["id"]) == list(template["id"])
    predictions = pd.read_csv(tmp_path / "out" / "predictions.csv").set_index("id")
    for _, row in submission.iterrows():
        stem = row["id"].removesuffix(".jpg")
        for c, t in zip("DGA", tuned, strict=True):
            assert row[c] == int(predictions.loc[stem, f"diagnosis/prob/{c}"] > t)
