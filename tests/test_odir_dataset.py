"""ODIR loaders on synthetic replicas of both layouts (the ODIR study's, ODIR-5K's), the study's
label distribution, keyword labels, seeded augmentation, errors, and ``make-odir``."""

import csv

import pandas as pd
import pytest
import torch

import moekit.projects  # noqa: F401  (registers transfer_classifier)
from moekit.cli import main
from moekit.data.collate import collate_samples
from moekit.data.odir import (
    ODIR5K_CLASSES,
    Odir5kDataset,
    OdirDataset,
    eye_labels,
    split_keywords,
)
from moekit.data.replicas.odir import (
    META_FILE,
    ODIR5K_IMAGES,
    ODIR5K_TABLE,
    STUDY_PATTERNS,
    make_odir5k_replica,
    make_odir_replica,
    pattern_counts,
)
from moekit.errors import ConfigError, DataError
from moekit.losses.task_losses import resolve_auto_counts
from moekit.registry import DATASETS, MODELS, TASK_LOSSES
from moekit.types import Task, run_model

COUNTS = {"train": 24, "val": 6, "offsite_test": 6, "onsite_test": 4}
SIZE = (32, 32)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return make_odir_replica(tmp_path_factory.mktemp("odir") / "replica", COUNTS, size=64)


@pytest.fixture(scope="module")
def odir5k(tmp_path_factory):
    return make_odir5k_replica(tmp_path_factory.mktemp("odir5k") / "replica", 6, size=64)


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------- the study's distribution
def test_pattern_counts_are_the_studys_at_800_and_proportional_otherwise():
    counts = pattern_counts(800)
    assert counts == STUDY_PATTERNS
    positives = [sum(n * p[c] for p, n in counts.items()) for c in range(3)]
    assert positives == [517, 163, 142]
    assert sum(n for p, n in counts.items() if sum(p) == 2) == 22
    assert all(sum(p) >= 1 for p in counts)  # no all-negative rows
    for n in (1, 7, 200, 250):
        assert sum(pattern_counts(n).values()) == n


def test_replica_layout_labels_and_meta(study):
    train = read_rows(study / "train.csv")
    assert list(train[0]) == ["id", "D", "G", "A"] and len(train) == 24
    onsite = read_rows(study / "onsite_test_submission.csv")
    assert list(onsite[0]) == ["id"] and len(onsite) == 4
    expected = pattern_counts(24)
    got = {}
    for row in train:
        pattern = tuple(int(row[c]) for c in "DGA")
        got[pattern] = got.get(pattern, 0) + 1
    assert got == {p: n for p, n in expected.items() if n}
    meta = {(r["split"], r["id"]): r for r in read_rows(study / META_FILE)}
    assert len(meta) == sum(COUNTS.values())
    for row in train:
        info = meta[("train", row["id"])]
        assert [info[c] for c in "DGA"] == [row[c] for c in "DGA"]
        disc_x, macula_x = float(info["disc_x"]), float(info["macula_x"])
        assert row["id"].endswith("_right.jpg") == (disc_x > macula_x)  # the eye painted
        assert 0 < disc_x < int(info["width"]) and 0 < float(info["disc_y"]) < int(info["height"])
        cup = float(info["cup_ratio"])
        assert (0.6 <= cup <= 0.85) if row["G"] == "1" else (0.3 <= cup <= 0.5)
    with pytest.raises(DataError, match="already exists"):
        make_odir_replica(study, COUNTS, size=64)


# ----------------------------------------------------------------- the study's loader
def test_study_loader_splits_samples_and_label_counts(study):
    train = DATASETS.build({"type": "odir", "root": str(study), "image_size": list(SIZE)})
    rows = read_rows(study / "train.csv")
    assert len(train) == 24 and train.ids == [r["id"] for r in rows]
    sample = train[3]
    assert sample["inputs"].shape == (3, *SIZE) and sample["inputs"].dtype == torch.float32
    expected = [float(rows[3][c]) for c in "DGA"]
    assert sample["targets"]["diagnosis"].tolist() == expected
    assert sample["has_target"] == {"diagnosis": True}
    assert sample["meta"] == {"split": "train", "id": rows[3]["id"]}
    positives = [sum(int(r[c]) for r in rows) for c in "DGA"]
    assert train.label_counts("diagnosis") == positives
    onsite = OdirDataset(study, split="onsite_test", image_size=SIZE)
    assert onsite[0]["has_target"] == {"diagnosis": False}
    assert onsite[0]["targets"]["diagnosis"].tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ConfigError, match="no labels"):
        onsite.label_counts("diagnosis")
    with pytest.raises(ConfigError, match="no task 'dga'"):
        train.label_counts("dga")


def test_class_balanced_weights_from_the_replicas_counts(study):
    """CB-BCE with counts: auto gets the training labels' positives, before any augmentation."""
    train = OdirDataset(study, split="train", image_size=SIZE)
    spec = resolve_auto_counts(
        {"type": "class_balanced_bce", "counts": "auto"}, "diagnosis", lambda: train
    )
    counts = [sum(int(r[c]) for r in read_rows(study / "train.csv")) for c in "DGA"]
    assert spec["counts"] == counts
    raw = [(1 - 0.999) / (1 - 0.999**n) for n in counts]
    expected = [3 * w / sum(raw) for w in raw]
    loss = TASK_LOSSES.build(spec)
    assert loss.pos_weight.tolist() == pytest.approx(expected, rel=1e-6)


def test_augmentation_is_seeded_per_sample_and_epoch(study):
    train = OdirDataset(study, split="train", image_size=SIZE, seed=3)
    first = train[0]["inputs"]
    assert torch.equal(first, train[0]["inputs"])  # same epoch, same draw
    train.set_epoch(1)
    assert not torch.equal(first, train[0]["inputs"])
    train.set_epoch(0)
    assert torch.equal(first, train[0]["inputs"])
    val = OdirDataset(study, split="val", image_size=SIZE)
    plain = OdirDataset(study, split="val", image_size=SIZE, augment={"rotate": 0.0})
    assert torch.equal(val[1]["inputs"], val[1]["inputs"])
    assert "Rotate" in repr(plain.transform) and "Rotate" not in repr(val.transform)


def test_study_loader_errors_name_the_file(study, tmp_path):
    with pytest.raises(ConfigError, match="unknown split 'test'"):
        OdirDataset(study, split="test")
    with pytest.raises(DataError, match="root folder not found"):
        OdirDataset(tmp_path / "none")
    broken = tmp_path / "broken"
    (broken / "images" / "train").mkdir(parents=True)
    table = broken / "train.csv"
    table.write_text("id,D,G,AMD\na.jpg,1,0,0\n")
    with pytest.raises(DataError, match="no column 'A'"):
        OdirDataset(broken)
    table.write_text("id,D,G,A\na.jpg,1,0,0\n")
    with pytest.raises(DataError, match=r"row 2: 'a.jpg' has no image"):
        OdirDataset(broken)
    (broken / "images" / "train" / "a.jpg").write_bytes(b"")
    table.write_text("id,D,G,A\na.jpg,1,2,0\n")
    with pytest.raises(DataError, match="labels must be 0 or 1, got '2'"):
        OdirDataset(broken)
    table.write_text("id,D,G,A\na.jpg,1,0,0\na.jpg,0,1,0\n")
    with pytest.raises(DataError, match="listed twice"):
        OdirDataset(broken)
    table.write_text("id,D,G,A\na.jpg,1,0,0\n")
    with pytest.raises(DataError, match=r"a\.jpg: cannot"):
        OdirDataset(broken)[0]


# ----------------------------------------------------------------- ODIR-5K
def test_keywords_give_per_eye_labels():
    def labels(text):
        row = eye_labels(split_keywords(text))
        return {name for name, v in zip(ODIR5K_CLASSES, row) if v}

    assert split_keywords("normal fundus，lens dust") == ["normal fundus", "lens dust"]
    assert labels("normal fundus，lens dust") == {"N"}
    assert labels("moderate non proliferative retinopathy") == {"D"}
    assert labels("mild nonproliferative retinopathy, glaucoma") == {"D", "G"}
    assert labels("proliferative diabetic retinopathy") == {"D"}
    assert labels("hypertensive retinopathy，drusen") == {"H", "O"}
    assert labels("dry age-related macular degeneration") == {"A"}
    assert labels("pathological myopia，cataract") == {"M", "C"}
    assert labels("normal fundus，epiretinal membrane") == {"O"}
    assert labels(float("nan")) == set() and labels("lens dust") == set()


def test_odir5k_eyes_patients_and_labels(odir5k):
    table = pd.read_excel(odir5k / ODIR5K_TABLE)
    assert list(table.columns[:7]) == [
        "ID",
        "Patient Age",
        "Patient Sex",
        "Left-Fundus",
        "Right-Fundus",
        "Left-Diagnostic Keywords",
        "Right-Diagnostic Keywords",
    ]
    eyes = Odir5kDataset(odir5k, split="all", image_size=SIZE)
    assert len(eyes) == 2 * 6 - 1  # the last patient's left-eye file is missing
    assert [p.name for p in eyes.missing] == [table["Left-Fundus"].iloc[-1]]
    meta = {r["id"]: r for r in read_rows(odir5k / META_FILE)}
    matrix = eyes.label_matrix("diagnosis")
    for row, (patient, eye) in zip(matrix.tolist(), eyes.samples):
        painted = meta[patient.images[eye].name]
        dga = [row[ODIR5K_CLASSES.index(c)] for c in "DGA"]
        assert dga == [float(painted[c]) for c in "DGA"]  # keyword labels = the eye painted
        assert row[0] == float(not any(dga))
    by_patient = Odir5kDataset(odir5k, split="all", eye_labels="patient", image_size=SIZE)
    for row, (patient, _) in zip(by_patient.label_matrix().tolist(), by_patient.samples):
        assert row == [float(v) for v in patient.labels]
    sample = eyes[0]
    assert sample["inputs"].shape == (3, *SIZE)
    assert sample["targets"]["diagnosis"].shape == (8,)


def test_odir5k_patient_views_collate_with_present_and_run_the_model(odir5k):
    patients = Odir5kDataset(odir5k, split="all", view="patient", image_size=SIZE)
    assert len(patients) == 6
    batch = collate_samples([patients[i] for i in range(len(patients))])
    assert list(batch.inputs) == ["left", "right"]
    assert batch.present.tolist() == [[True, True]] * 5 + [[False, True]]
    assert batch.inputs["left"][5].abs().sum() == 0  # a filler no model may read
    tasks = {
        "diagnosis": Task.from_config(
            "diagnosis", {"kind": "multilabel", "num_classes": 8, "loss": ["bce"]}
        )
    }
    spec = {"type": "transfer_classifier", "classifier": "linear"}
    model = MODELS.build(spec, tasks=tasks).eval()
    with torch.no_grad():
        preds = run_model(model, batch).preds["diagnosis"]
        alone = model(batch.inputs["right"][5:]).preds["diagnosis"]
    assert preds.shape == (6, 8)
    torch.testing.assert_close(preds[5:], alone)  # the absent left eye is never read


def test_odir5k_carve_keeps_patients_whole_and_reads_csv_tables(odir5k, tmp_path):
    train = Odir5kDataset(odir5k, split="train", val_fraction=0.34, image_size=SIZE)
    val = Odir5kDataset(odir5k, split="val", val_fraction=0.34, image_size=SIZE)
    train_ids = {p.patient_id for p in train.patients}
    val_ids = {p.patient_id for p in val.patients}
    assert not train_ids & val_ids and len(val_ids) == 2 and len(train_ids | val_ids) <= 6
    copy = tmp_path / "csv"
    copy.mkdir()
    pd.read_excel(odir5k / ODIR5K_TABLE).to_csv(copy / "data.csv", index=False)
    from_csv = Odir5kDataset(
        copy, table="data.csv", images=str(odir5k / ODIR5K_IMAGES), split="all", image_size=SIZE
    )
    assert torch.equal(from_csv.label_matrix(), Odir5kDataset(odir5k, split="all").label_matrix())
    with pytest.raises(ConfigError, match="unknown view 'eyes'"):
        Odir5kDataset(odir5k, view="eyes")
    with pytest.raises(DataError, match="image folder not found"):
        Odir5kDataset(odir5k, images="nowhere")
    with pytest.raises(DataError, match="no column 'ID'"):
        pd.DataFrame({"Id": [1]}).to_csv(copy / "bad.csv", index=False)
        Odir5kDataset(copy, table="bad.csv", images=str(odir5k / ODIR5K_IMAGES))


def test_make_odir_command(tmp_path, capsys):
    out = tmp_path / "study"
    args = ["--n-train", "5", "--n-val", "2", "--n-offsite", "2", "--n-onsite", "1"]
    assert main(["data", "make-odir", str(out), *args, "--size", "48", "--seed", "2"]) == 0
    assert "5 train / 2 val / 2 offsite_test / 1 onsite_test" in capsys.readouterr().out
    assert len(OdirDataset(out, split="offsite_test", image_size=SIZE)) == 2
    assert main(["data", "make-odir", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    five = tmp_path / "odir5k"
    assert main(["data", "make-odir", "--out", str(five), "--layout", "odir5k", "--csv",
                 "--n-patients", "2", "--size", "48"]) == 0  # fmt: skip
    table = next(five.glob("*.csv"))
    dataset = Odir5kDataset(five, table=table.name, split="all", image_size=SIZE)
    assert len(dataset) == 3
    assert main(["data", "make-odir", str(tmp_path / "x"), "--n-train", "-1"]) == 2
