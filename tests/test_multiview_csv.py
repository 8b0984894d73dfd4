"""The multiview_csv loader on the four-view mammography replica and small hand-made tables."""

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from moekit.cli import main
from moekit.data.collate import collate_samples
from moekit.data.image_io import read_grey
from moekit.data.multiview_csv import IGNORE_INDEX, MultiViewCsvDataset, multiview_csv_tasks
from moekit.data.replicas.mammography import CSV_NAME, DENSITY, VIEWS, make_mammography_replica
from moekit.errors import ConfigError, DataError
from moekit.registry import DATASETS
from moekit.types import Task

SIZE = [32, 24]
TASKS = {
    "density": {"kind": "multiclass", "column": "density", "classes": list(DENSITY)},
    "findings": {"kind": "multilabel", "columns": ["mass", "calcification"]},
    "age": {"kind": "regression", "column": "age"},
    "mass_lcc": {"kind": "segmentation", "column": "L_CC_mask", "view": "L_CC"},
}


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    root = tmp_path_factory.mktemp("mammo")
    return make_mammography_replica(root, n_cases=40, size=(48, 64), missing_view=0.2, seed=2)


@pytest.fixture(scope="module")
def table(replica):
    return pd.read_csv(replica / CSV_NAME, dtype=str, keep_default_na=False)


@pytest.fixture
def copy(replica, tmp_path):
    return shutil.copytree(replica, tmp_path / "mammo")


def _ds(root, **kwargs):
    kwargs.setdefault("views", list(VIEWS))
    kwargs.setdefault("tasks", TASKS)
    kwargs.setdefault("image_size", SIZE)
    kwargs.setdefault("channels", 1)
    kwargs.setdefault("id_column", "case_id")
    return MultiViewCsvDataset(root / CSV_NAME, **kwargs)


def test_rows_views_and_labels_follow_the_table(replica, table):
    ds = _ds(replica, split="all", augment=False)
    assert ds.keys == list(table.case_id)
    for index in range(len(ds)):
        row = table.iloc[index]
        sample = ds[index]
        assert list(sample["inputs"]) == [v for v in VIEWS if row[v]]
        assert sample["modalities"] == dict.fromkeys(VIEWS, (1, *SIZE))
        labelled = {
            "density": row.density != "",
            "findings": row.mass != "",
            "age": row.age != "",
            "mass_lcc": row.L_CC != "",
        }
        assert sample["has_target"] == labelled
        if labelled["density"]:
            assert sample["targets"]["density"].item() == DENSITY.index(row.density)
        else:
            assert sample["targets"]["density"].item() == IGNORE_INDEX
        if labelled["findings"]:
            expected = [float(row.mass), float(row.calcification)]
            assert sample["targets"]["findings"].tolist() == expected
        if labelled["age"]:
            assert sample["targets"]["age"].tolist() == pytest.approx([float(row.age)])
        assert sample["meta"]["line"] == index + 2


def test_batches_carry_present_per_view(replica, table):
    ds = _ds(replica, split="all")
    batch = collate_samples([ds[i] for i in range(8)])
    expected = [[bool(table.iloc[i][v]) for v in VIEWS] for i in range(8)]
    assert batch.modalities == VIEWS and batch.present.tolist() == expected
    assert batch.inputs["L_CC"].shape == (8, 1, *SIZE)
    assert all(any(row) for row in expected)  # never all four views missing


def test_mass_mask_moves_with_its_view(replica, table):
    ds = _ds(replica, split="all", augment=True, seed=4, image_size=[64, 48])
    with_mass = [
        i for i in range(len(ds)) if table.iloc[i].L_CC and ds[i]["targets"]["mass_lcc"].sum() > 20
    ]
    assert with_mass
    for epoch in range(3):
        ds.set_epoch(epoch)
        for index in with_mass:
            sample = ds[index]
            mask = sample["targets"]["mass_lcc"][0].bool()
            image = sample["inputs"]["L_CC"][0]
            assert image[mask].mean() > image[~mask].mean() + 0.5


def test_dropped_or_missing_view_unlabels_its_masks(replica, table):
    ds = _ds(replica, split="all", modality_dropout=0.6, seed=1)
    for epoch in range(4):
        ds.set_epoch(epoch)
        for index in range(len(ds)):
            sample = ds[index]
            assert sample["inputs"]
            assert sample["has_target"]["mass_lcc"] == ("L_CC" in sample["inputs"])


def test_split_column_and_stratified_carve(replica, table):
    test = _ds(replica, split="test", split_column="split")
    assert test.keys == list(table[table.split == "test"].case_id)
    train = _ds(replica, split="train", split_column="split", val_fraction=0.25, val_seed=3)
    val = _ds(replica, split="val", split_column="split", val_fraction=0.25, val_seed=3)
    rows = list(table[table.split == "train"].case_id)
    assert sorted(train.keys + val.keys) == sorted(rows) and not set(train.keys) & set(val.keys)
    assert len(val) == round(0.25 * len(rows))
    train_counts = pd.Series(table.set_index("case_id").loc[rows].density).value_counts()
    val_counts = pd.Series(val.class_labels("density")).value_counts()
    for name, count in train_counts.items():
        key = DENSITY.index(name) if name else None
        if key is not None:
            assert abs(val_counts.get(key, 0) - 0.25 * count) <= 1
    without_column = _ds(replica, split="val", val_fraction=0.25, val_seed=3)
    assert len(without_column) == round(0.25 * len(table))


def test_val_rows_in_the_table_are_used_as_they_are(copy):
    path = copy / CSV_NAME
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    table.loc[:4, "split"] = "val"
    table.to_csv(path, index=False)
    val = _ds(copy, split="val", split_column="split", val_fraction=0.5)
    assert val.keys == list(table.case_id[:5])


def test_one_image_column_gives_tensor_inputs(replica, table):
    ds = _ds(replica, views={"image": "R_MLO"}, tasks={"density": TASKS["density"]}, split="all")
    assert ds.left_out == list(table[table.R_MLO == ""].case_id)
    sample = ds[0]
    assert isinstance(sample["inputs"], torch.Tensor) and sample["inputs"].shape == (1, *SIZE)
    assert collate_samples([ds[0], ds[1]]).present is None


def test_rgb_views_and_sixteen_bit_images(tmp_path):
    wide = (np.arange(12 * 16, dtype=np.uint16).reshape(12, 16) * 20).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / "a.png")
    grey, size = read_grey(tmp_path / "a.png")
    assert size == (12, 16) and grey.max() == 255 and grey[0, 1] == round(20 * 255 / wide.max())
    Image.fromarray(np.zeros((12, 16, 3), np.uint8)).save(tmp_path / "b.jpg")
    pd.DataFrame({"img": ["a.png", "b.jpg"], "y": ["0", "1"]}).to_csv(
        tmp_path / "t.csv", index=False
    )
    tasks = {"y": {"kind": "multiclass", "column": "y", "num_classes": 2}}
    ds = MultiViewCsvDataset(tmp_path / "t.csv", ["img"], tasks, split="all", image_size=[8, 8])
    assert ds[0]["inputs"].shape == (3, 8, 8) and ds[1]["targets"]["y"].item() == 1
    assert ds.keys == ["2", "3"]


def test_config_block_matches_the_dataset():
    block = multiview_csv_tasks(TASKS)
    tasks = {name: Task.from_config(name, spec) for name, spec in block.items()}
    assert tasks["density"].num_classes == 4 and tasks["findings"].num_classes == 2
    assert tasks["density"].options["class_names"] == list(DENSITY)
    assert tasks["mass_lcc"].kind == "segmentation" and tasks["age"].kind == "regression"


def test_table_errors_name_the_file_line_and_column(copy):
    path = copy / CSV_NAME
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    with pytest.raises(DataError, match="no column 'densty'; did you mean 'density'"):
        _ds(copy, tasks={"d": {**TASKS["density"], "column": "densty"}})
    bad = table.copy()
    bad.loc[2, "density"] = "E"
    bad.to_csv(path, index=False)
    with pytest.raises(DataError, match=r"line 4: 'density' is 'E', not one of the classes"):
        _ds(copy)
    bad = table.copy()
    bad.loc[1, "mass"] = "yes"
    bad.to_csv(path, index=False)
    with pytest.raises(DataError, match=r"line 3: 'mass' is 'yes', expected 0 or 1"):
        _ds(copy)
    bad = table.copy()
    bad.loc[0, "split"] = "training"
    bad.to_csv(path, index=False)
    with pytest.raises(DataError, match="line 2: 'split' is 'training'"):
        _ds(copy, split_column="split")
    bad = table.copy()
    bad.loc[3, "case_id"] = bad.loc[2, "case_id"]
    bad.to_csv(path, index=False)
    with pytest.raises(DataError, match=r"line 5: id .* repeats line 4"):
        _ds(copy)
    table.to_csv(path, index=False)
    image = copy / table.loc[table.L_CC != "", "L_CC"].iloc[0]
    image.unlink()
    with pytest.raises(DataError, match=f"image {image} .'L_CC'. not found"):
        _ds(copy)


def test_truncated_image_is_a_one_line_error(copy, table):
    ds = _ds(copy, split="all")
    index = next(i for i in range(len(table)) if table.R_CC[i])
    image = copy / table.R_CC[index]
    image.write_bytes(image.read_bytes()[:60])
    with pytest.raises(DataError) as err:
        ds[index]
    assert str(image) in str(err.value) and "\n" not in str(err.value)


def test_config_errors(replica):
    with pytest.raises(ConfigError, match=r"unknown key 'colum'; .*did you mean 'column'"):
        _ds(replica, tasks={"x": {"kind": "multiclass", "colum": "density"}})
    with pytest.raises(ConfigError, match="name the view the masks are drawn on"):
        _ds(replica, tasks={"m": {"kind": "segmentation", "column": "L_CC_mask"}})
    with pytest.raises(ConfigError, match="multiclass task needs 'classes'"):
        _ds(replica, tasks={"d": {"kind": "multiclass", "column": "density"}})
    with pytest.raises(ConfigError, match="channels: expected 1 or 3"):
        _ds(replica, channels=2)
    with pytest.raises(ConfigError, match="did you mean 'L_CC'"):
        _ds(replica, augment={"L_CCC": False})


def test_builds_from_the_registry_and_the_cli_writes_a_replica(tmp_path, capsys):
    assert main(["data", "make-multiview", str(tmp_path / "m"), "--n-cases", "6"]) == 0
    assert "6 cases" in capsys.readouterr().out
    ds = DATASETS.build(
        {
            "type": "multiview_csv",
            "csv": str(tmp_path / "m" / CSV_NAME),
            "views": list(VIEWS),
            "tasks": TASKS,
            "split": "all",
            "channels": 1,
            "image_size": SIZE,
        }
    )
    assert len(ds) == 6
    assert main(["data", "make-multiview", "--out", str(tmp_path / "m")]) == 2


@pytest.mark.slow
def test_one_view_table_trains_a_single_image_model(replica, tmp_path):
    from moekit.engine import Trainer

    data = {
        "type": "multiview_csv",
        "csv": str(replica / CSV_NAME),
        "views": {"image": "R_CC"},
        "tasks": {
            "density": TASKS["density"],
            "mass_rcc": {**TASKS["mass_lcc"], "column": "R_CC_mask", "view": "image"},
        },
        "split_column": "split",
        "channels": 1,
        "image_size": SIZE,
    }
    cfg = {
        "name": "one_view",
        "seed": 0,
        "output_dir": str(tmp_path / "runs"),
        "tasks": {
            name: {**spec, "loss": ["cross_entropy" if name == "density" else "bce"]}
            for name, spec in multiview_csv_tasks(data["tasks"]).items()
        },
        "data": {
            "train": {**data, "split": "train"},
            "val": {**data, "split": "val"},
            "batch_size": 4,
        },
        "model": {"type": "tiny_mtl", "width": 4, "in_channels": 1},
        "train": {"epochs": 1},
    }
    summary = Trainer(cfg).fit()
    assert summary["status"] == "completed"
