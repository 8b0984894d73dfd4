"""The synthetic IDRiD replica: the real layout, learnable labels, determinism, the CLI."""

import csv
from collections import Counter

import cv2
import numpy as np
import pytest
from PIL import Image

from moekit.cli import main
from moekit.data.idrid import LAYOUT, LESIONS, read_grading_csv
from moekit.data.image_io import read_mask, read_rgb
from moekit.data.preprocess import find_field
from moekit.data.replicas.fundus import CAMERAS, FundusGeometry, FundusPainter
from moekit.data.replicas.idrid import (
    frame_size,
    macular_edema_risk,
    make_idrid_replica,
    paint,
    plan_for_grade,
    retinopathy_grade,
)
from moekit.errors import ConfigError, DataError


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


def _geometries(count=200, seed=0):
    out = []
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        camera = list(CAMERAS)[i % len(CAMERAS)]
        out.append(FundusGeometry.sample(rng, *frame_size((384, 256), camera), camera=camera))
    return out


def test_anatomy_has_the_proportions_of_real_eyes():
    """Disc 1/9-1/5 of the field (1/7 at 45-50 degrees), fovea about 2.5 disc diameters
    temporal and a little below the disc, both eyes, the disc always inside the field."""
    geometries = _geometries()
    ratio = np.array([g.disc_diameter / (2 * g.radius) for g in geometries])
    wide = np.array([CAMERAS[g.camera].degrees[0] >= 40 for g in geometries])
    assert 0.12 < np.median(ratio[wide]) < 0.165 and ratio.min() > 0.09 and ratio.max() < 0.25
    distance = np.array(
        [
            np.hypot(g.disc_center[0] - g.macula_center[0], g.disc_center[1] - g.macula_center[1])
            / g.disc_diameter
            for g in geometries
        ]
    )
    assert 2.2 < np.median(distance) < 2.8 and distance.min() > 1.7 and distance.max() < 3.4
    assert np.mean([g.disc_center[1] < g.macula_center[1] for g in geometries]) > 0.9
    assert 0.35 < np.mean([g.nasal > 0 for g in geometries]) < 0.65
    for g in geometries:
        offset = np.hypot(g.disc_center[0] - g.center[0], g.disc_center[1] - g.center[1])
        assert offset + g.disc_radius < g.radius
        assert g.disc_radius <= g.disc_center[1] <= g.height - g.disc_radius


def test_the_disc_is_not_at_a_fixed_place():
    positions = np.array(
        [
            (
                (g.disc_center[0] - g.center[0]) / g.radius,
                (g.disc_center[1] - g.center[1]) / g.radius,
            )
            for g in _geometries()
        ]
    )
    horizontal = np.abs(positions[:, 0])
    assert horizontal.min() < 0.2 and horizontal.max() > 0.6  # disc-centred to macula-centred
    assert positions[:, 1].std() > 0.04


@pytest.fixture(scope="module")
def photographs():
    """Painted photographs of every camera with their geometry and masks."""
    out = []
    for i in range(36):
        rng = np.random.default_rng([5, i])
        camera = list(CAMERAS)[i % len(CAMERAS)]
        geometry = FundusGeometry.sample(rng, *frame_size((192, 128), camera), camera=camera)
        painter = FundusPainter(geometry, rng)
        painter.paint_anatomy()
        if i % 3 == 0:
            painter.add_exudate_cluster(painter.point_around(geometry.macula_center, 0, 40))
        out.append((geometry, *painter.finish()))
    return out


def test_colours_are_those_of_fundus_photographs(photographs):
    """Red above green above blue in the retina (R/G about 2, B/G about 0.5 in real sets),
    a range of brightness, and a disc brighter than the retina around it in green."""
    retina, lift = [], []
    for g, photo, masks in photographs:
        yy, xx = np.mgrid[0 : g.height, 0 : g.width]
        field = np.hypot(xx - g.center[0], yy - g.center[1]) < 0.9 * g.radius
        od = masks["OD"].astype(bool)
        near = np.hypot(xx - g.disc_center[0], yy - g.disc_center[1]) < 3 * g.disc_radius
        rgb = photo[field & ~od].astype(float).mean(axis=0)
        retina.append(rgb)
        lift.append(photo[od][:, 1].mean() / photo[near & field & ~od][:, 1].mean())
    retina = np.array(retina)
    assert (retina[:, 0] > retina[:, 1]).all() and (retina[:, 1] > retina[:, 2]).all()
    assert 1.6 < np.median(retina[:, 0] / retina[:, 1]) < 3.0
    assert 0.3 < np.median(retina[:, 2] / retina[:, 1]) < 0.7
    assert retina[:, 0].min() < 120 and retina[:, 0].max() > 170  # dark and bright photographs
    assert min(lift) > 1.05 and np.median(lift) > 1.25


def test_bright_things_that_are_not_the_disc_exist(photographs):
    """Exudates, reflections and flare: in some photographs part of the retina away from the
    disc is brighter (green) than the disc's median."""
    count = 0
    for g, photo, masks in photographs:
        yy, xx = np.mgrid[0 : g.height, 0 : g.width]
        away = np.hypot(xx - g.disc_center[0], yy - g.disc_center[1]) > 2 * g.disc_radius
        field = np.hypot(xx - g.center[0], yy - g.center[1]) < g.radius
        disc = np.median(photo[masks["OD"].astype(bool)][:, 1])
        count += (photo[away & field][:, 1] > disc).sum() >= 4
    assert 0.15 * len(photographs) <= count < len(photographs)


def test_the_field_of_view_step_finds_every_camera_s_circle(photographs):
    for g, photo, _ in photographs:
        field = find_field(photo)
        assert field.circle is not None, g.camera
        cx, cy, r = field.circle
        error = max(abs(cx - g.center[0]), abs(cy - g.center[1]), abs(r - g.radius))
        assert error < 0.03 * g.radius + 1, (g.camera, field.circle, g.center, g.radius)


def test_drusen_are_yellow_deposits_at_the_macula_with_an_exact_mask():
    rng = np.random.default_rng(3)
    g = FundusGeometry.sample(rng, 384, 256)
    painter = FundusPainter(g, rng)
    painter.paint_anatomy()
    before = painter.image.copy()
    centres = painter.add_drusen(25)
    drusen = painter.masks["drusen"].astype(bool)
    assert len(centres) == 25 and drusen.any()
    changed = np.abs(painter.image - before).max(axis=2) > 0.05
    assert changed[drusen].mean() > 0.9  # where the mask is, the picture changed ...
    assert (changed & ~cv2_dilate(drusen, 3)).sum() == 0  # ... and nowhere far from it
    yy, xx = np.nonzero(drusen)
    reach = np.hypot(xx - g.macula_center[0], yy - g.macula_center[1])
    assert reach.max() < 1.5 * g.disc_diameter + 0.03 * g.radius
    assert (painter.image[drusen][:, 1] > before[drusen][:, 1]).mean() > 0.9  # lighter
    _, masks = painter.finish()
    assert set(masks) == {"MA", "HE", "EX", "SE", "OD", "cup", "drusen"}


def cv2_dilate(mask, pixels):
    kernel = np.ones((2 * pixels + 1, 2 * pixels + 1), np.uint8)
    return cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)


def test_make_replica_cameras_argument(tmp_path):
    root = make_idrid_replica(tmp_path / "r", 3, 0, 2, 1, size=(96, 64), cameras={"square": 1})
    for path in LAYOUT.grading_images(root, "train").iterdir():
        assert read_rgb(path)[1] == (64, 64)
    with pytest.raises(ConfigError, match="cameras"):
        make_idrid_replica(tmp_path / "s", 1, 0, 1, 0, cameras={"nikon": 1})
