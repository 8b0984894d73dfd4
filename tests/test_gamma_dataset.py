"""The GAMMA loader on tiny replicas of the real folder layout."""

import shutil
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from moekit.cli import main
from moekit.data.collate import collate_samples
from moekit.data.gamma import (
    GRADES,
    IGNORE_INDEX,
    LAYOUT,
    GammaDataset,
    evenly_spaced,
    gamma_tasks,
    list_bscans,
    patient_id,
    read_grades,
    split_mask,
)
from moekit.data.replicas.gamma import TRUTH_FILE, make_gamma_replica
from moekit.errors import ConfigError, DataError
from moekit.registry import DATASETS
from moekit.types import Task

FUNDUS = [32, 48]
OCT = [24, 16]


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    root = tmp_path_factory.mktemp("gamma")
    return make_gamma_replica(
        root,
        n_train=16,
        n_test=3,
        num_bscans=12,
        fundus_size=(96, 64),
        oct_size=(32, 48),
        seg_fraction=0.5,
        seg_only_fraction=0.2,
        missing_fraction=0.25,
        seed=3,
    )


@pytest.fixture(scope="module")
def truth(replica):
    return pd.read_csv(replica / TRUTH_FILE, dtype={"id": str}, keep_default_na=False)


@pytest.fixture
def copy(replica, tmp_path):
    """A private copy of the replica that a test may damage."""
    return shutil.copytree(replica, tmp_path / "gamma")


def _ds(root, **kwargs):
    kwargs.setdefault("fundus_size", FUNDUS)
    kwargs.setdefault("oct_size", OCT)
    kwargs.setdefault("num_bscans", 4)
    return GammaDataset(root, **kwargs)


def _train(truth):
    return truth[truth.split == "train"]


def test_ids_grades_and_sources_follow_the_table(replica, truth):
    ds = _ds(replica, val_fraction=0.0, augment=False)
    rows = _train(truth)
    assert [pid for _, pid in ds.keys] == sorted(rows.id)
    graded = rows[rows.grade != ""]
    assert ds.class_labels() == [int(g) for g in graded.sort_values("id").grade]
    assert Counter(ds.sources) == {"grading": 16, "segmentation": 3}
    sample = ds[ds.keys.index(("train", graded.id.iloc[0]))]
    assert sample["targets"]["grade"].item() == int(graded.grade.iloc[0])
    assert sample["meta"] == {"split": "train", "id": graded.id.iloc[0], "source": "grading"}


def test_sample_shapes_and_dtypes(replica):
    ds = _ds(replica, val_fraction=0.0, augment=False)
    full = next(i for i, r in enumerate(ds.records) if r.fundus and r.bscans and r.mask)
    sample = ds[full]
    assert sample["modalities"] == {"fundus": (3, *FUNDUS), "oct": (4, *OCT)}
    assert sample["inputs"]["fundus"].shape == (3, *FUNDUS)
    assert sample["inputs"]["oct"].shape == (4, *OCT)
    assert sample["inputs"]["oct"].dtype == torch.float32
    assert sample["inputs"]["oct"].min() >= -1.0 and sample["inputs"]["oct"].max() <= 1.0
    assert sample["targets"]["disc"].shape == (1, *FUNDUS)
    assert all(sample["has_target"].values())


def test_config_block_matches_the_loader():
    block = gamma_tasks()
    tasks = {name: Task.from_config(name, spec) for name, spec in block.items()}
    assert tasks["grade"].num_classes == 3 and tasks["grade"].options["class_names"] == list(GRADES)
    assert tasks["cup"].kind == "segmentation"


def test_patient_numbers_become_folder_names():
    assert patient_id(1, "x") == "0001" and patient_id("0042", "x") == "0042"
    assert patient_id(7.0, "x") == "0007"
    with pytest.raises(DataError, match="patient number"):
        patient_id("P1", "table.xlsx row 2")


def test_bscans_sort_by_integer_not_by_string(tmp_path):
    for k in (0, 1, 2, 9, 10, 11, 100):
        (tmp_path / f"{k}_image.jpg").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a B-scan")
    names = [p.name for p in list_bscans(tmp_path)]
    assert names == [f"{k}_image.jpg" for k in (0, 1, 2, 9, 10, 11, 100)]


def test_volume_is_read_in_integer_order(copy):
    ds = _ds(copy, val_fraction=0.0, augment=False)
    index = next(i for i, r in enumerate(ds.records) if r.bscans)
    folder = ds.records[index].bscans[0].parent
    for k in range(12):  # B-scan k is a flat grey level that grows with k
        Image.fromarray(np.full((48, 32), 10 + 20 * k, np.uint8)).save(folder / f"{k}_image.jpg")
    volume = _ds(copy, val_fraction=0.0, augment=False, num_bscans=None)[index]["inputs"]["oct"]
    levels = volume.mean(dim=(1, 2))
    assert volume.shape[0] == 12 and bool((levels[1:] > levels[:-1]).all())


def test_kept_bscans_are_evenly_spaced(replica):
    assert evenly_spaced(256, 16) == list(range(8, 256, 16))
    assert evenly_spaced(12, 1) == [6] and evenly_spaced(5, 5) == [0, 1, 2, 3, 4]
    ds = _ds(replica, val_fraction=0.0, num_bscans=3)
    record = next(r for r in ds.records if r.bscans)
    assert [p.name for p in record.bscans] == ["2_image.jpg", "6_image.jpg", "10_image.jpg"]


def test_too_few_bscans_is_an_error_naming_the_folder(replica):
    with pytest.raises(DataError, match="fewer than num_bscans"):
        _ds(replica, num_bscans=13)


def test_masks_split_cup_and_rim_and_cup_lies_in_disc(replica):
    grey = np.array([[0, 128, 255], [60, 190, 200]], np.uint8)
    disc, cup = split_mask(grey)
    assert disc.tolist() == [[1, 1, 0], [1, 1, 0]] and cup.tolist() == [[1, 0, 0], [1, 0, 0]]
    ds = _ds(replica, val_fraction=0.0, tasks=["disc", "cup"], modalities=["fundus"])
    masked = [i for i, r in enumerate(ds.records) if r.mask]
    assert masked
    for i in masked:
        sample = ds[i]
        disc, cup = sample["targets"]["disc"], sample["targets"]["cup"]
        assert cup.sum() > 0 and disc.sum() > cup.sum()
        assert bool((cup <= disc).all())


def test_patient_without_a_mask_is_masked_per_task(replica):
    ds = _ds(replica, val_fraction=0.0)
    index = next(i for i, r in enumerate(ds.records) if r.grade is not None and not r.mask)
    sample = ds[index]
    assert sample["has_target"] == {"grade": True, "disc": False, "cup": False}
    assert sample["targets"]["disc"].sum() == 0


def test_segmentation_only_patient_has_no_grade_and_no_oct(replica):
    ds = _ds(replica, val_fraction=0.0)
    index = ds.sources.index("segmentation")
    sample = ds[index]
    assert set(sample["inputs"]) == {"fundus"}
    assert sample["has_target"] == {"grade": False, "disc": True, "cup": True}
    assert sample["targets"]["grade"].item() == IGNORE_INDEX


def test_missing_modalities_are_absent_from_the_sample_and_the_batch_mask(replica, truth):
    ds = _ds(replica, val_fraction=0.0)
    rows = _train(truth).set_index("id")
    no_fundus = next(pid for pid, r in rows.iterrows() if not r.has_fundus)
    no_oct = next(pid for pid, r in rows.iterrows() if r.grade != "" and not r.has_oct)
    picks = [ds.keys.index(("train", pid)) for pid in (no_fundus, no_oct)]
    samples = [ds[i] for i in picks]
    assert set(samples[0]["inputs"]) == {"oct"} and set(samples[1]["inputs"]) == {"fundus"}
    assert samples[0]["has_target"]["disc"] is False
    batch = collate_samples(samples)
    assert batch.modalities == ("fundus", "oct")
    assert batch.present.tolist() == [[False, True], [True, False]]
    assert batch.inputs["fundus"][0].abs().sum() == 0 and batch.inputs["oct"][1].abs().sum() == 0


def test_patient_with_no_loaded_modality_is_left_out(replica, truth):
    ds = _ds(replica, val_fraction=0.0, tasks=["grade"], modalities=["oct"])
    rows = _train(truth)
    without = sorted(rows[(rows.grade != "") & ~rows.has_oct.astype(bool)].id)
    assert without and ds.left_out == without
    assert isinstance(ds[0]["inputs"], torch.Tensor) and ds[0]["inputs"].shape == (4, *OCT)
    assert "modalities" not in ds[0]


def test_dict_inputs_keeps_the_dict_for_one_modality(replica):
    ds = _ds(replica, val_fraction=0.0, modalities=["fundus"], dict_inputs=True)
    sample = ds[0]
    assert list(sample["inputs"]) == ["fundus"] and sample["modalities"] == {"fundus": (3, *FUNDUS)}


def test_truncated_jpeg_is_a_one_line_error_naming_the_file(copy):
    ds = _ds(copy, val_fraction=0.0)
    index = next(i for i, r in enumerate(ds.records) if r.fundus and r.bscans)
    record = ds.records[index]
    for path in (record.fundus, record.bscans[1]):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
        with pytest.raises(DataError) as err:
            ds[index]
        assert str(path) in str(err.value) and "\n" not in str(err.value)
        path.write_bytes(data)


def test_misspelt_column_in_the_xlsx_names_the_file_and_the_column(copy):
    path = LAYOUT.grades_table(copy, "train")
    table = pd.read_excel(path).rename(columns={"mid_advanced": "mid_advance"})
    table.to_excel(path, index=False)
    with pytest.raises(DataError) as err:
        _ds(copy)
    message = str(err.value)
    assert str(path) in message and "'mid_advanced'" in message and "did you mean" in message


def test_grading_table_as_csv_and_one_hot_errors(copy):
    xlsx = LAYOUT.grades_table(copy, "train")
    table = pd.read_excel(xlsx)
    csv = xlsx.with_suffix(".csv")
    table.to_csv(csv, index=False)
    xlsx.unlink()
    assert read_grades(csv) == {f"{int(d):04d}": int(np.argmax(r)) for d, *r in table.values}
    assert len(_ds(copy, val_fraction=0.0, tasks=["grade"])) == 16
    table.loc[2, "early"] = 1
    table.loc[2, "non"] = 1
    table.to_csv(csv, index=False)
    with pytest.raises(DataError, match=r"row 4: non, early, mid_advanced must be one-hot"):
        read_grades(csv)


def test_table_and_folders_must_agree(copy):
    folder = LAYOUT.patients_dir(copy, "train") / "0999"
    folder.mkdir()
    with pytest.raises(DataError, match="0999: patient folder has no row"):
        _ds(copy)
    folder.rmdir()
    shutil.rmtree(LAYOUT.patients_dir(copy, "train") / "0002")
    with pytest.raises(DataError, match="patient '0002' has no folder"):
        _ds(copy)


def test_mask_without_photograph_and_missing_root(copy, tmp_path):
    photo = next(LAYOUT.seg_images_dir(copy, "train").glob("*.jpg"))
    photo.unlink()
    with pytest.raises(DataError, match="mask has no photograph"):
        _ds(copy, tasks=["disc"])
    with pytest.raises(DataError, match="GAMMA root folder not found"):
        _ds(tmp_path / "nowhere")


def test_validation_carve_is_stratified_disjoint_and_stable(replica):
    train = _ds(replica, split="train", val_fraction=0.25, val_seed=1)
    val = _ds(replica, split="val", val_fraction=0.25, val_seed=1)
    everything = _ds(replica, val_fraction=0.0)
    assert set(train.keys).isdisjoint(val.keys)
    assert sorted(train.keys + val.keys) == sorted(everything.keys)
    graded_val = Counter(val.class_labels())
    graded_all = Counter(everything.class_labels())
    for grade, count in graded_all.items():
        assert abs(graded_val[grade] - 0.25 * count) <= 1
    grade_only = _ds(replica, split="val", val_fraction=0.25, val_seed=1, tasks=["grade"])
    assert [k for k, s in zip(val.keys, val.sources) if s == "grading"] == grade_only.keys
    other = _ds(replica, split="val", val_fraction=0.25, val_seed=2)
    assert other.keys != val.keys


def test_test_split_reads_the_testing_folders(replica, truth):
    ds = _ds(replica, split="test")
    assert [pid for _, pid in ds.keys] == sorted(truth[truth.split == "test"].id)


def test_draws_are_per_sample_and_epoch(replica):
    ds = _ds(replica, val_fraction=0.0, modality_dropout=0.5, seed=5)
    index = next(i for i, r in enumerate(ds.records) if r.fundus and r.bscans)
    first = ds[index]
    again = ds[index]
    for name, tensor in first["inputs"].items():
        assert torch.equal(tensor, again["inputs"][name])
    patterns = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        sample = ds[index]
        patterns.add(tuple(sample["inputs"]))
        assert sample["inputs"]
        if "fundus" not in sample["inputs"]:
            assert sample["has_target"]["disc"] is False
    assert patterns == {("fundus",), ("oct",), ("fundus", "oct")}


def test_fundus_and_masks_share_the_augmentation(replica):
    ds = _ds(replica, val_fraction=0.0, tasks=["disc", "cup"], augment=True, seed=1)
    plain = _ds(replica, val_fraction=0.0, tasks=["disc", "cup"], augment=False)
    index = next(i for i, r in enumerate(ds.records) if r.mask)
    moved = []
    for epoch in range(4):
        ds.set_epoch(epoch)
        moved.append(ds[index])
    reference = plain[index]["targets"]["disc"]
    assert any(not torch.equal(s["targets"]["disc"], reference) for s in moved)
    for sample in moved:  # the disc is the brightest region of the photograph, wherever it went
        disc = sample["targets"]["disc"][0].bool()
        brightness = sample["inputs"].mean(0)
        assert brightness[disc].mean() > brightness[~disc].mean() + 0.2


def test_builds_from_registry_and_config_errors(replica):
    ds = DATASETS.build({"type": "gamma", "root": str(replica), "split": "test", "num_bscans": 2})
    assert Counter(ds.sources) == {"grading": 3, "segmentation": 1}
    with pytest.raises(ConfigError, match="did you mean 'fundus'"):
        _ds(replica, modalities=["fundas"])
    with pytest.raises(ConfigError, match="needs source 'grading'"):
        _ds(replica, tasks=["disc"], modalities=["fundus", "oct"])
    with pytest.raises(ConfigError, match="modality_dropout"):
        _ds(replica, modality_dropout=1.0)
    with pytest.raises(ConfigError, match="augment"):
        _ds(replica, augment={"octt": False})


def test_make_gamma_command_writes_a_loadable_replica(tmp_path, capsys):
    out = tmp_path / "replica"
    code = main(
        ["data", "make-gamma", "--out", str(out), "--n-train", "4", "--bscans", "3", "--csv"]
    )
    assert code == 0 and "wrote a GAMMA replica" in capsys.readouterr().out
    assert LAYOUT.grades_table(out, "train", ".csv").is_file()
    ds = GammaDataset(out, val_fraction=0.0, num_bscans=3, fundus_size=FUNDUS, oct_size=OCT)
    assert len(ds.class_labels()) == 4
    assert main(["data", "make-gamma", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.slow
def test_trains_a_single_modality_model_through_the_engine(replica, tmp_path):
    from moekit.engine import Trainer

    data = {"type": "gamma", "root": str(replica), "tasks": ["grade"], "modalities": ["oct"]}
    data.update(num_bscans=4, oct_size=OCT)
    cfg = {
        "name": "gamma_oct",
        "seed": 0,
        "output_dir": str(tmp_path / "runs"),
        "tasks": {
            "grade": {
                "kind": "multiclass",
                "num_classes": 3,
                "loss": ["cross_entropy"],
                "metrics": ["accuracy", "kappa"],
            }
        },
        "data": {
            "train": {**data, "split": "train", "modality_dropout": 0.3},
            "val": {**data, "split": "val"},
            "batch_size": 4,
        },
        "model": {"type": "tiny_mtl", "width": 4, "in_channels": 4},
        "train": {"epochs": 1},
    }
    summary = Trainer(cfg).fit()
    assert summary["status"] == "completed"
