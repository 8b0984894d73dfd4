"""The synthetic IDRiD replica: the real layout, learnable labels, determinism, the CLI."""

import csv
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from moekit.cli import main
from moekit.data.idrid import LAYOUT, LESIONS, read_grading_csv
from moekit.data.image_io import read_mask, read_rgb
from moekit.data.replicas.fundus import CAMERAS, FundusGeometry, FundusPainter
from moekit.data.replicas.idrid import (
    frame_size,
    macular_edema_risk,
    make_idrid_replica,
    paint,
    plan_for_grade,
    retinopathy_grade,
)
from moekit.errors import DataError


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    root = tmp_path_factory.mktemp("replica")
    return make_idrid_replica(root, 12, 4, 8, 4, size=(96, 64), seed=0)


def test_layout_is_the_real_one(replica):
    seg = replica / "A. Segmentation"
    grading = replica / "B. Disease Grading"
    assert sorted(p.name for p in replica.iterdir()) == ["A. Segmentation", "B. Disease Grading"]
    train_images = sorted(
        p.name for p in (grading / "1. Original Images" / "a. Training Set").iterdir()
    )
    assert train_images == [f"IDRiD_{i:03d}.jpg" for i in range(1, 13)]
    test_images = sorted(
        p.name for p in (grading / "1. Original Images" / "b. Testing Set").iterdir()
    )
    assert test_images == [f"IDRiD_{i:03d}.jpg" for i in range(1, 5)]  # ids restart
    assert (grading / "2. Groundtruths" / "a. IDRiD_Disease Grading_Training Labels.csv").is_file()
    assert (grading / "2. Groundtruths" / "b. IDRiD_Disease Grading_Testing Labels.csv").is_file()
    seg_test = sorted(p.name for p in (seg / "1. Original Images" / "b. Testing Set").iterdir())
    assert seg_test == [f"IDRiD_{i:02d}.jpg" for i in range(9, 13)]  # continue after train
    masks = seg / "2. All Segmentation Groundtruths" / "a. Training Set"
    assert sorted(p.name for p in masks.iterdir()) == [
        "1. Microaneurysms",
        "2. Haemorrhages",
        "3. Hard Exudates",
        "4. Soft Exudates",
        "5. Optic Disc",
    ]
    assert (masks / "1. Microaneurysms" / "IDRiD_01_MA.tif").is_file()
    widths = {frame_size((96, 64), camera)[0] for camera in CAMERAS}
    for path in (grading / "1. Original Images" / "a. Training Set").iterdir():
        image, (height, width) = read_rgb(path)
        assert height == 64 and width in widths and image.dtype == np.uint8


def test_csv_has_the_real_header_and_empty_columns(replica):
    path = LAYOUT.grading_csv(replica, "train")
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["Image name", "Retinopathy grade", "Risk of macular edema ", "", ""]
    assert rows[1][0] == "IDRiD_001" and rows[1][3:] == ["", ""]
    assert len(rows) == 13


def test_masks_modes_presence_and_the_rgba_mask(replica):
    modes = Counter()
    present = Counter()
    for split, ids in (("train", range(1, 9)), ("test", range(9, 13))):
        for i in ids:
            for lesion in LESIONS:
                path = LAYOUT.mask_path(replica, split, f"IDRiD_{i:02d}", lesion)
                if path.is_file():
                    present[split, lesion] += 1
                    modes[Image.open(path).mode] += 1
    assert {"P", "1", "L", "RGBA"} <= set(modes) and modes["RGBA"] == 1
    rgba = LAYOUT.mask_path(replica, "test", "IDRiD_12", "EX")
    assert Image.open(rgba).mode == "RGBA"
    assert (np.asarray(Image.open(rgba))[..., 3] == 255).all()
    assert 0 < read_mask(rgba).mean() < 0.2
    assert present["train", "SE"] == 4 and present["test", "SE"] == 2  # about half
    assert present["train", "HE"] == 7 and present["test", "HE"] == 4  # one missing in train
    for lesion in ("MA", "EX", "OD"):
        assert present["train", lesion] == 8 and present["test", lesion] == 4
    od = read_mask(LAYOUT.mask_path(replica, "train", "IDRiD_01", "OD"))
    assert 0.005 < od.mean() < 0.1


def test_labels_follow_the_painted_lesions():
    rng = np.random.default_rng(0)
    for grade in range(5):
        for mer in (0,) if grade < 2 else (0, 1, 2):
            painted = paint(rng, (192, 128), plan_for_grade(rng, grade, mer))
            assert (painted.rg, painted.mer) == (grade, mer)
            has_ex = painted.masks["EX"].any()
            assert has_ex == (mer > 0)
            assert painted.masks["HE"].any() == (grade >= 2)


def test_grading_rules():
    assert retinopathy_grade(0, 0, 0) == 0
    assert retinopathy_grade(3, 0, 0) == 1
    assert retinopathy_grade(3, 2, 0) == 2 and retinopathy_grade(3, 0, 5) == 2
    assert retinopathy_grade(0, 5, 0) == 3 and retinopathy_grade(0, 12, 0) == 4
    assert macular_edema_risk([], (0, 0), 10) == 0
    assert macular_edema_risk([(30, 0), (9, 0)], (0, 0), 10) == 2
    assert macular_edema_risk([(30, 0)], (0, 0), 10) == 1


def test_lesions_are_visible_in_the_photograph():
    rng = np.random.default_rng(1)
    painter = FundusPainter(FundusGeometry.sample(rng, 192, 128), rng)
    painter.paint_anatomy()
    painter.add_microaneurysms(10)
    painter.add_exudate_cluster(painter.geometry.macula_center)
    image, masks = painter.finish()
    luminance = image.astype(float).mean(axis=2)
    g = painter.geometry
    yy, xx = np.mgrid[0 : g.height, 0 : g.width]
    inner = np.hypot(xx - g.center[0], yy - g.center[1]) < 0.8 * g.radius
    background = inner & ~masks["MA"].astype(bool) & ~masks["EX"].astype(bool)
    assert luminance[masks["MA"].astype(bool)].mean() < luminance[background].mean() - 15
    assert luminance[masks["EX"].astype(bool)].mean() > luminance[background].mean() + 40
    assert image[0, 0].max() < 10  # dark outside the circular field


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    a = make_idrid_replica(tmp_path / "a", 2, 1, 2, 1, size=(64, 48), seed=5)
    b = make_idrid_replica(tmp_path / "b", 3, 1, 2, 1, size=(64, 48), seed=5)
    c = make_idrid_replica(tmp_path / "c", 2, 1, 2, 1, size=(64, 48), seed=6)
    name = "B. Disease Grading/1. Original Images/a. Training Set/IDRiD_001.jpg"
    assert (a / name).read_bytes() == (b / name).read_bytes()  # a prefix of a larger replica
    assert (a / name).read_bytes() != (c / name).read_bytes()
    od = LAYOUT.mask_path(a, "train", "IDRiD_01", "OD").relative_to(a)
    assert (a / od).read_bytes() == (b / od).read_bytes()
    labels_a, labels_b = (read_grading_csv(LAYOUT.grading_csv(r, "test")) for r in (a, b))
    assert labels_a == labels_b


def test_refuses_to_overwrite_a_replica(replica):
    with pytest.raises(DataError, match="already exists"):
        make_idrid_replica(replica, 1, 1, 1, 1, size=(64, 48))


def test_cli_make_idrid(tmp_path, capsys):
    out = tmp_path / "idrid"
    args = ["--n-grading", "4", "--n-seg", "2", "--size", "64x48", "--seed", "1"]
    assert main(["data", "make-idrid", str(out), *args]) == 0
    assert "grading 4 train / 1 test, segmentation 2 train / 1 test" in capsys.readouterr().out
    assert len(read_grading_csv(LAYOUT.grading_csv(out, "train"))) == 4
    assert read_rgb(LAYOUT.segmentation_images(out, "test") / "IDRiD_03.jpg")[1][0] == 48
    assert main(["data", "make-idrid", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["data", "make-idrid", str(out), "--size", "64"])
