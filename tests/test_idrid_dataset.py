"""The IDRiD loader on tiny replicas of the real folder layout."""

import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from moekit.data.collate import collate_samples
from moekit.data.idrid import (
    IGNORE_INDEX,
    LAYOUT,
    LESIONS,
    IdridDataset,
    idrid_tasks,
    read_grading_csv,
    stratified_split,
)
from moekit.data.image_io import read_rgb
from moekit.data.preprocess import FundusFov
from moekit.data.replicas.idrid import make_idrid_replica
from moekit.errors import ConfigError, DataError
from moekit.registry import DATASETS
from moekit.types import Task

SIZE = [32, 48]


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    root = tmp_path_factory.mktemp("idrid")
    return make_idrid_replica(root, 20, 6, 6, 3, size=(96, 64), seed=3)


@pytest.fixture
def copy(replica, tmp_path):
    """A private copy of the replica that a test may damage."""
    return shutil.copytree(replica, tmp_path / "idrid")


def _ds(root, **kwargs):
    kwargs.setdefault("image_size", SIZE)
    return IdridDataset(root, **kwargs)


def test_builds_from_registry_config(replica):
    ds = DATASETS.build(
        {"type": "idrid", "root": str(replica), "split": "test", "image_size": SIZE}
    )
    assert Counter(ds.sources) == {"grading": 6, "segmentation": 3}


def test_sample_format_of_both_sources(replica):
    ds = _ds(replica, split="train", val_fraction=0.0)
    grading = ds[ds.sources.index("grading")]
    seg = ds[ds.sources.index("segmentation")]
    for sample in (grading, seg):
        assert sample["inputs"].shape == (3, *SIZE) and sample["inputs"].dtype == torch.float32
        assert list(sample["targets"]) == ["rg", "mer", *LESIONS]
        for lesion in LESIONS:
            mask = sample["targets"][lesion]
            assert mask.shape == (1, *SIZE) and mask.dtype == torch.float32
            assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert grading["has_target"] == {"rg": True, "mer": True, **dict.fromkeys(LESIONS, False)}
    assert seg["has_target"] == {"rg": False, "mer": False, **dict.fromkeys(LESIONS, True)}
    assert grading["targets"]["rg"].dtype == torch.long and grading["targets"]["rg"].ndim == 0
    assert seg["targets"]["rg"].item() == IGNORE_INDEX == seg["targets"]["mer"].item()
    assert all(grading["targets"][lesion].sum() == 0 for lesion in LESIONS)
    assert seg["targets"]["OD"].sum() > 0
    assert grading["meta"]["source"] == "grading" and seg["meta"]["split"] == "train"


def test_grades_come_from_the_csv(replica):
    labels = read_grading_csv(LAYOUT.grading_csv(replica, "test"))
    ds = _ds(replica, split="test", tasks=["rg", "mer"])
    for i in range(len(ds)):
        sample = ds[i]
        rg, mer = labels[sample["meta"]["id"]]
        assert (sample["targets"]["rg"].item(), sample["targets"]["mer"].item()) == (rg, mer)


def test_mixed_batch_collates_with_has_target_per_task(replica):
    ds = _ds(replica, split="test")
    batch = collate_samples([ds[0], ds[len(ds) - 1]])
    assert batch.inputs.shape == (2, 3, *SIZE)
    assert batch.has_target["rg"].tolist() == [True, False]
    assert batch.has_target["SE"].tolist() == [False, True]
    assert batch.targets["MA"].shape == (2, 1, *SIZE)
    assert batch.meta["source"] == ["grading", "segmentation"]


def test_grading_ids_restart_per_split_and_samples_are_keyed_by_split(replica):
    train = _ds(replica, split="train", val_fraction=0.0, tasks=["rg"])
    test = _ds(replica, split="test", tasks=["rg"])
    assert ("train", "IDRiD_001") in train.keys and ("test", "IDRiD_001") in test.keys
    assert not set(train.keys) & set(test.keys)
    a = train[train.keys.index(("train", "IDRiD_001"))]
    b = test[test.keys.index(("test", "IDRiD_001"))]
    assert not torch.equal(a["inputs"], b["inputs"])
    assert len(set(train.keys)) == len(train)


def test_segmentation_test_ids_continue_after_train(replica):
    test = _ds(replica, split="test", tasks=["OD"])
    assert [key for key in test.keys] == [("test", f"IDRiD_{i:02d}") for i in (7, 8, 9)]


def test_missing_se_mask_is_all_negative_but_labelled(replica):
    ds = _ds(replica, split="train", val_fraction=0.0, tasks=list(LESIONS))
    missing = [i for i, r in enumerate(ds.records) if dict(r.masks)["SE"] is None]
    present = [i for i, r in enumerate(ds.records) if dict(r.masks)["SE"] is not None]
    assert missing and present
    for i in missing:
        sample = ds[i]
        assert sample["has_target"]["SE"] is True
        assert sample["targets"]["SE"].sum() == 0
    assert any(ds[i]["targets"]["SE"].sum() > 0 for i in present)


def test_rgba_test_mask_is_read_from_colour_channels(replica):
    ds = _ds(replica, split="test", tasks=["EX"], image_size=[64, 96])
    last = ds.records[-1]
    ex_path = dict(last.masks)["EX"]
    assert Image.open(ex_path).mode == "RGBA"
    ex = ds[len(ds) - 1]["targets"]["EX"]
    assert 0 < ex.mean() < 0.2  # a few exudates, not the whole image


def test_val_is_carved_from_train_stratified_disjoint_and_seeded(replica):
    full = _ds(replica, split="train", val_fraction=0.0)
    train = _ds(replica, split="train", val_fraction=0.25, val_seed=1)
    val = _ds(replica, split="val", val_fraction=0.25, val_seed=1)
    assert not set(train.keys) & set(val.keys)
    assert sorted(train.keys + val.keys) == sorted(full.keys)
    assert all(r.split == "train" for r in val.records)  # never from the test folder
    assert Counter(val.sources) == {"grading": 5, "segmentation": 2}  # 25% of 20 and of 6
    again = _ds(replica, split="val", val_fraction=0.25, val_seed=1)
    assert again.keys == val.keys
    others = {
        tuple(_ds(replica, split="val", val_fraction=0.25, val_seed=s).keys) for s in range(2, 6)
    }
    assert len(others | {tuple(val.keys)}) > 1
    grades = Counter(r.grades[0] for r in full.records if r.grades)
    val_grades = Counter(r.grades[0] for r in val.records if r.grades)
    for grade, count in grades.items():
        assert abs(val_grades[grade] - 0.25 * count) < 1


def test_grading_val_split_ignores_whether_segmentation_is_loaded(replica):
    both = _ds(replica, split="val", tasks=["rg", "MA"])
    grading_only = _ds(replica, split="val", tasks=["rg"])
    assert [k for k, s in zip(both.keys, both.sources) if s == "grading"] == grading_only.keys


def test_idrid_tasks_block_parses_as_tasks():
    block = idrid_tasks(["OD", "rg"])
    assert list(block) == ["rg", "OD"]
    rg, od = (Task.from_config(name, spec) for name, spec in block.items())
    assert (rg.kind, rg.num_classes) == ("multiclass", 5)
    assert (od.kind, od.num_classes, od.is_dense) == ("segmentation", 1, True)
    assert idrid_tasks()["mer"]["num_classes"] == 3


def test_stratified_split_exact_total_and_per_stratum_quota():
    strata = [0] * 10 + [1] * 5 + [2] * 3 + [3]
    chosen = stratified_split(strata, 0.2, seed=0)
    assert sum(chosen) == round(0.2 * len(strata))
    picked = Counter(s for s, c in zip(strata, chosen) if c)
    assert picked[0] == 2 and picked[1] == 1
    assert chosen == stratified_split(strata, 0.2, seed=0)


def test_task_subsets_choose_sources(replica):
    grading = _ds(replica, split="test", tasks=["rg", "mer"])
    assert set(grading.sources) == {"grading"}
    assert list(grading[0]["targets"]) == ["rg", "mer"]
    lesions = _ds(replica, split="test", tasks=["OD", "MA"])
    assert set(lesions.sources) == {"segmentation"}
    sample = lesions[0]
    assert list(sample["targets"]) == ["MA", "OD"]  # canonical order
    both = _ds(replica, split="test", tasks=["rg"], sources=["grading", "segmentation"])
    assert both[len(both) - 1]["has_target"] == {"rg": False}


def test_config_mistakes_are_config_errors(replica):
    with pytest.raises(ConfigError, match="did you mean 'OD'"):
        _ds(replica, tasks=["OD_"])
    with pytest.raises(ConfigError, match="split 'tran'"):
        _ds(replica, split="tran")
    with pytest.raises(ConfigError, match="val_fraction"):
        _ds(replica, val_fraction=1.5)
    with pytest.raises(ConfigError, match="image_size"):
        _ds(replica, image_size=256)
    with pytest.raises(ConfigError, match="needs val_fraction > 0"):
        _ds(replica, split="val", val_fraction=0.0)
    with pytest.raises(ConfigError, match="must not be empty"):
        _ds(replica, tasks=[])


def test_wrong_root_is_a_clear_error(tmp_path, replica):
    with pytest.raises(DataError, match="IDRiD root folder not found") as info:
        _ds(tmp_path / "nowhere")
    assert "nowhere" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(DataError, match=r"B. Disease Grading/1. Original Images"):
        _ds(tmp_path)  # exists, but is not an IDRiD root
    with pytest.raises(DataError, match=r"A. Segmentation"):
        _ds(replica / "A. Segmentation")  # one level too deep


def test_corrupt_jpeg_names_the_file(copy):
    path = LAYOUT.grading_images(copy, "test") / "IDRiD_002.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 garbage" + bytes(range(256)))
    ds = _ds(copy, split="test", tasks=["rg"])
    with pytest.raises(DataError, match=r"IDRiD_002.jpg"):
        ds[ds.keys.index(("test", "IDRiD_002"))]


def test_mask_size_mismatch_names_the_mask(copy):
    path = LAYOUT.mask_path(copy, "test", "IDRiD_07", "OD")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(path)
    ds = _ds(copy, split="test", tasks=["OD"])
    with pytest.raises(
        DataError, match=r"IDRiD_07_OD.tif: mask is 10x10 but its image .* is 96x64"
    ):
        ds[0]


def test_csv_with_trailing_space_empty_columns_bom_and_blank_rows(copy):
    path = LAYOUT.grading_csv(copy, "test")
    lines = path.read_text().splitlines()
    assert lines[0] == "Image name,Retinopathy grade,Risk of macular edema ,,"
    path.write_bytes(("\ufeff" + "\r\n".join([*lines, ",,,,", ",,,,"]) + "\r\n").encode())
    labels = read_grading_csv(path)
    assert len(labels) == 6 and "IDRiD_001" in labels
    assert len(_ds(copy, split="test", tasks=["rg"])) == 6


def test_missing_csv_column_names_the_csv_and_column(copy):
    path = LAYOUT.grading_csv(copy, "train")
    text = path.read_text().replace("Risk of macular edema ", "Macular edema")
    path.write_text(text)
    with pytest.raises(
        DataError, match=r"Training Labels.csv: missing column 'Risk of macular edema'"
    ):
        _ds(copy, tasks=["rg"])


def test_bad_grade_and_label_image_mismatch(copy):
    path = LAYOUT.grading_csv(copy, "test")
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "IDRiD_001,7,0,,", *lines[2:]]))
    with pytest.raises(DataError, match="row 2: 'Retinopathy grade' must be an integer 0-4"):
        _ds(copy, split="test", tasks=["rg"])
    path.write_text("\n".join(lines[:-1]))  # drop the last row
    with pytest.raises(DataError, match=r"IDRiD_006.jpg: image has no row in"):
        _ds(copy, split="test", tasks=["rg"])
    path.write_text("\n".join([*lines, "IDRiD_099,1,0,,"]))
    with pytest.raises(DataError, match="'IDRiD_099' has no image"):
        _ds(copy, split="test", tasks=["rg"])


def test_non_image_files_are_ignored(copy):
    folder = LAYOUT.segmentation_images(copy, "test")
    (folder / ".DS_Store").write_bytes(b"\0\1")
    (folder / "notes.txt").write_text("hello")
    assert len(_ds(copy, split="test", tasks=["OD"])) == 3


def test_missing_lesion_folder_is_an_error_only_when_that_lesion_is_loaded(copy):
    shutil.rmtree(LAYOUT.mask_dir(copy, "test", "SE"))
    with pytest.raises(DataError, match=r"4. Soft Exudates: folder not found"):
        _ds(copy, split="test", tasks=["SE", "OD"])
    with pytest.raises(DataError, match=r"4. Soft Exudates: folder not found"):
        _ds(copy, split="test")  # all seven tasks
    only_od = _ds(copy, split="test", tasks=["OD"])
    assert len(only_od) == 3 and set(only_od[0]["targets"]) == {"OD"}


def test_lesion_subsets_carve_the_same_validation_images(replica):
    every = {k for k in _ds(replica, split="val", tasks=list(LESIONS)).keys}
    assert {k for k in _ds(replica, split="val", tasks=["OD"]).keys} == every
    assert {k for k in _ds(replica, split="val", tasks=["MA", "EX"]).keys} == every


def test_class_labels_come_from_the_index_in_sample_order(replica):
    ds = _ds(replica, split="test")
    grades = [ds[i]["targets"]["rg"].item() for i in range(len(ds)) if ds.sources[i] == "grading"]
    assert ds.class_labels("rg") == grades and len(grades) == 6
    assert ds.class_labels("mer") == [
        ds[i]["targets"]["mer"].item() for i in range(len(ds)) if ds.sources[i] == "grading"
    ]
    with pytest.raises(ConfigError, match="not a loaded grading task"):
        _ds(replica, split="test", tasks=["OD"]).class_labels("rg")


def test_augmentation_is_a_function_of_seed_epoch_and_sample(replica, monkeypatch):
    """Sample i of epoch e is augmented from (seed, e, i): the same in any worker, process,
    batch size and order, so a run resumed mid-epoch repeats it exactly."""

    def epoch_batches(ds, epoch, workers, batch_size=4):
        ds.set_epoch(epoch)
        loader = DataLoader(
            ds, batch_size=batch_size, num_workers=workers, collate_fn=collate_samples
        )
        return torch.cat([b.inputs for b in loader])

    ds = _ds(replica, split="test", augment=True, seed=5)
    first = epoch_batches(ds, 0, 0)
    assert torch.equal(first, epoch_batches(ds, 0, 0))
    assert torch.equal(first, epoch_batches(ds, 0, 2, batch_size=3))
    assert not torch.equal(first, epoch_batches(ds, 1, 0))
    assert not torch.equal(first, epoch_batches(_ds(replica, split="test", augment=True), 0, 0))
    ds.set_epoch(0)
    last = len(ds) - 1
    assert torch.equal(ds[last]["inputs"], first[last])  # alone, out of order
    monkeypatch.setenv("RANK", "1")
    assert torch.equal(ds[last]["inputs"], first[last])  # on another process
    plain = _ds(replica, split="test")  # augment defaults to false outside train
    assert torch.equal(plain[0]["inputs"], plain[0]["inputs"])


def test_augment_mapping_configures_the_train_transform(replica):
    ds = _ds(
        replica,
        split="test",
        augment={
            "rotate": 0.0,
            "hflip": 1.0,
            "scale": [1.0, 1.0],
            "translate": 0.0,
            "contrast_p": 0.0,
            "blur_p": 0.0,
            "colour_p": 0.0,
            "jpeg_p": 0.0,
        },
    )
    plain = _ds(replica, split="test")
    torch.testing.assert_close(ds[0]["inputs"], plain[0]["inputs"].flip(-1))


def test_default_preprocess_is_the_fundus_field_of_view(replica):
    ds = _ds(replica, split="test", tasks=["OD"])
    assert ds.preprocess_config == {"type": "fundus_fov"}
    assert isinstance(ds.preprocess, FundusFov)
    plain = _ds(replica, split="test", tasks=["OD"], preprocess="resize")
    assert plain.preprocess_config == {"type": "resize"}
    custom = _ds(
        replica, split="test", tasks=["OD"], preprocess={"type": "fundus_fov", "extent": "circle"}
    )
    assert custom.preprocess.extent == "circle"
    with pytest.raises(ConfigError, match="did you mean 'fundus_fov'"):
        _ds(replica, split="test", tasks=["OD"], preprocess={"type": "fundus_fvo"})


def test_masks_follow_the_photograph_through_the_preprocessing(tmp_path):
    """Photographs of several cameras: after fundus_fov the disc mask lies on the brightest
    part of the picture, and the field is centred and black around it."""
    root = make_idrid_replica(tmp_path / "r", 0, 0, 1, 6, size=(192, 128), seed=4)
    ds = _ds(root, split="test", tasks=["OD"], image_size=[48, 72])
    sizes = {read_rgb(r.image)[1] for r in ds.records}
    assert len(sizes) > 1  # several cameras' frames
    for i in range(len(ds)):
        sample = ds[i]
        od = sample["targets"]["OD"][0].bool()
        green = sample["inputs"][1]
        assert od.any() and green[od].mean() > green[~od].mean() + 0.3
        dark = sample["inputs"].amax(0) < 0  # below the ImageNet mean in every channel
        assert dark[:, :3].all() and dark[:, -3:].all()  # black corners
