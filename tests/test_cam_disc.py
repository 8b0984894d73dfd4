"""moekit.projects.odir.cam_disc: the optic disc of an ODIR replica photograph (its recorded
ellipse, on the photograph and on the model's input), the share of a map's mass inside it, and
disc_mass_share end to end on a run trained for two steps."""

import math
import re
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import moekit.projects  # noqa: F401  (registers transfer_classifier)
from moekit.analysis.gradcam import grad_cam, mass_inside
from moekit.data.image_io import read_rgb
from moekit.data.odir import OdirDataset
from moekit.data.replicas.odir import META_FILE, make_odir_replica
from moekit.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from moekit.errors import ConfigError, DataError
from moekit.projects.odir import cam_disc
from moekit.projects.odir.cam_disc import disc_mask, disc_mass_share, input_disc_mask

COUNTS = {"train": 16, "val": 8, "offsite_test": 16, "onsite_test": 2}
BAND = 2.0
"""Pixels nearer than this to the recorded ellipse may differ from it: ``disc_mask`` rasterises
at whole pixels (centre and semi-axes rounded, up to 0.5 px each, and the outline's pixels)."""


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    return make_odir_replica(tmp_path_factory.mktemp("odir") / "replica", COUNTS, size=96)


@pytest.fixture(scope="module")
def meta(replica):
    return pd.read_csv(replica / META_FILE, dtype={"id": str}).set_index(["split", "id"])


def ellipse_by_loop(row, height, width):
    """``(inside, gap)``: each pixel inside the recorded ellipse (semi-axes ``r`` and ``1.1 r``)
    and ``|s - 1| r`` with ``s`` its scaled radius, at most its distance to the ellipse."""
    cx, cy, r = float(row["disc_x"]), float(row["disc_y"]), float(row["disc_radius"])
    inside = np.zeros((height, width), bool)
    gap = np.zeros((height, width))
    for y in range(height):
        for x in range(width):
            s = math.sqrt(((x - cx) / r) ** 2 + ((y - cy) / (1.1 * r)) ** 2)
            inside[y, x] = s <= 1.0
            gap[y, x] = abs(s - 1.0) * r
    return inside, gap


def check_against_loop(row, height, width):
    mask = disc_mask(row, (height, width))
    inside, gap = ellipse_by_loop(row, height, width)
    assert mask.shape == (height, width) and mask.dtype == np.bool_
    far = gap > BAND
    assert np.array_equal(mask[far], inside[far])
    return mask, inside


# ----------------------------------------------------------------- the disc on the photograph
def test_disc_mask_is_the_recorded_ellipse_of_replica_rows(meta):
    rows = [meta.loc[key] for key in meta.index[meta["G"] == 1][:2]] + [meta.iloc[0]]
    for row in rows:
        mask, inside = check_against_loop(row, int(row["height"]), int(row["width"]))
        assert inside.sum() > 0
        overlap = (mask & inside).sum() / (mask | inside).sum()
        assert overlap > 0.6  # discs of 5-7 px: the band is a large part of them


def test_disc_mask_of_a_large_disc_and_of_discs_cut_by_the_frame():
    large = {"disc_x": 47.3, "disc_y": 31.6, "disc_radius": 22.4}
    mask, inside = check_against_loop(large, 64, 96)
    assert (mask & inside).sum() / (mask | inside).sum() > 0.9
    for axis in (0, 1):  # 45 columns wide, 49 rows high: 10 % taller than wide
        assert abs(int(mask.any(axis=axis).sum()) - int(inside.any(axis=axis).sum())) <= 2
    left = {"disc_x": 1.4, "disc_y": 30.2, "disc_radius": 9.3}  # half outside, left
    mask, inside = check_against_loop(left, 64, 96)
    assert mask[:, 0].any() and inside[:, 0].any() and not mask[:, 12:].any()
    corner = {"disc_x": 94.6, "disc_y": 61.8, "disc_radius": 12.7}  # beyond the bottom right
    mask, inside = check_against_loop(corner, 64, 96)
    assert mask[-1, -1] and mask[-1, :].sum() > 5 and mask[:, -1].sum() > 5


@given(
    st.floats(-6.0, 70.0),
    st.floats(-6.0, 50.0),
    st.floats(1.0, 20.0),
)
def test_disc_mask_agrees_with_the_ellipse_away_from_its_outline(cx, cy, radius):
    check_against_loop({"disc_x": cx, "disc_y": cy, "disc_radius": radius}, 44, 64)


# --------------------------------------------------------------- the disc on the model's input
def pallor(dataset, index):
    """``[H, W]`` the mean of the green and blue channels of sample ``index``'s input in
    ``[0, 1]``: the replica's disc (rim ``(1, 0.66, 0.4)``, cup ``(1, 0.9, 0.72)`` times the
    light) is paler than the retina around it (about ``(1, 0.5, 0.25)``), red alike."""
    x = dataset[index]["inputs"]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x * std + mean)[1:].mean(0).numpy()


def centre_on_input(dataset, path, row):
    """The disc centre moved to the input by pixel centres: photograph -> reduced decode ->
    crop and padding -> resize."""
    decoded, (height, width) = read_rgb(path, dataset.image_size)
    _, geometry = dataset.preprocess(decoded)
    fy, fx = decoded.shape[0] / height, decoded.shape[1] / width
    x = (float(row["disc_x"]) + 0.5) * fx - 0.5
    y = (float(row["disc_y"]) + 0.5) * fy - 0.5
    top, left, _, _ = geometry.crop
    pad_top, _, pad_left, _ = geometry.padding
    sy, sx = geometry.scale
    return (x - left + pad_left + 0.5) * sx - 0.5, (y - top + pad_top + 0.5) * sy - 0.5


@pytest.mark.parametrize(
    ("size", "preprocess"),
    [((64, 64), "resize"), ((40, 48), "fundus_fov")],  # (40, 48): a reduced JPEG decode
)
def test_input_disc_mask_covers_the_painted_disc(replica, meta, size, preprocess):
    dataset = OdirDataset(
        replica, "offsite_test", image_size=size, preprocess=preprocess, augment=False
    )
    for index, record in enumerate(dataset.records):
        row = meta.loc[("offsite_test", record.image_id)]
        mask = input_disc_mask(dataset, record.path, row)
        assert mask.shape == size and mask.dtype == np.bool_
        assert 0.0 < mask.mean() < 0.5
        pale = pallor(dataset, index)
        ys, xs = np.nonzero(mask)
        rim = np.zeros_like(mask)  # the mask's bounding box grown by two pixels, less the mask
        rim[
            max(0, ys.min() - 2) : ys.max() + 3,
            max(0, xs.min() - 2) : xs.max() + 3,
        ] = True
        rim &= ~mask
        disc = pale[mask].mean()
        assert disc > pale[rim].mean() + 0.02, record.image_id  # 5 grey levels
        assert disc > pale[~mask].mean() + 0.05, record.image_id
        x, y = centre_on_input(dataset, record.path, row)
        assert abs(xs.mean() - x) < 1.0 and abs(ys.mean() - y) < 1.0, record.image_id


# ------------------------------------------------------------------ the mass inside the disc
def test_mass_inside_the_input_disc(replica, meta):
    dataset = OdirDataset(replica, "offsite_test", image_size=(64, 64), augment=False)
    masks = np.stack(
        [
            input_disc_mask(dataset, r.path, meta.loc[("offsite_test", r.image_id)])
            for r in dataset.records[:6]
        ]
    )
    inside = torch.from_numpy(masks)
    assert torch.allclose(mass_inside(inside.float(), inside), torch.ones(6))
    area = torch.from_numpy(masks.reshape(6, -1).mean(axis=1)).float()
    assert torch.allclose(mass_inside(torch.full(masks.shape, 0.3), inside), area)
    maps = torch.rand(masks.shape, generator=torch.Generator().manual_seed(0))
    expected = [
        float((m.numpy() * k).sum() / m.numpy().sum()) for m, k in zip(maps, masks, strict=True)
    ]
    assert mass_inside(maps, inside).tolist() == pytest.approx(expected, rel=1e-5)
    assert torch.isnan(mass_inside(torch.zeros(masks.shape), inside)).all()


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def run(replica, tmp_path_factory):
    """The ODIR replica classifier (ResNet-18 from scratch) at 64x64, two steps of 8 images."""
    from moekit.cli import main

    overrides = [
        *(f"data.{s}.root={replica}" for s in ("train", "val", "test")),
        *(f"data.{s}.image_size=[64, 64]" for s in ("train", "val", "test")),
        "data.batch_size=8",
        "train.epochs=1",
        "train.curves=false",
    ]
    path = tmp_path_factory.mktemp("cam_disc") / "run"
    config = "configs/odir/replica_resnet18.yaml"
    assert main(["train", config, "--run-dir", str(path), "--set", *overrides]) == 0
    return path


def glaucoma_images(replica, meta):
    """``[(index, id, input mask)]`` of the G-positive off-site test images, in table order."""
    table = pd.read_csv(replica / "offsite_test.csv", dtype={"id": str})
    positive = set(table.loc[table["G"] == 1, "id"])
    dataset = OdirDataset(replica, "offsite_test", image_size=(64, 64), augment=False)
    picks = [
        (i, r.image_id, input_disc_mask(dataset, r.path, meta.loc[("offsite_test", r.image_id)]))
        for i, r in enumerate(dataset.records)
        if r.image_id in positive
    ]
    assert len(picks) == len(positive) > 0
    return dataset, picks


@pytest.mark.slow
def test_disc_mass_share_on_a_trained_run(run, replica, meta):
    from moekit.engine.checkpoint import load_model

    layer = "backbone.layer2"  # layer4's 2x2 maps of a model two steps old are often all zero
    result = disc_mass_share(run, layer=layer, batch_size=2)
    dataset, picks = glaucoma_images(replica, meta)
    assert result["images"] == len(picks)
    assert [r["id"] for r in result["per_image"]] == [image_id for _, image_id, _ in picks]
    areas = [float(mask.mean()) for _, _, mask in picks]
    assert [r["area"] for r in result["per_image"]] == pytest.approx(areas)
    model, _, _ = load_model(run, "best")
    for (index, _, mask), row in zip(picks, result["per_image"], strict=True):
        cam = grad_cam(model, dataset[index]["inputs"][None], "diagnosis", [1], layer).maps[0, 0]
        cam = cam.numpy().astype(np.float64)
        if cam.sum() > 0:
            assert row["mass"] == pytest.approx((cam * mask).sum() / cam.sum(), rel=1e-4, abs=1e-6)
        else:  # an all-zero map (every weighted activation negative) has no mass
            assert math.isnan(row["mass"])
    defined = [r for r in result["per_image"] if not math.isnan(r["mass"])]
    assert result["empty_maps"] == len(picks) - len(defined)
    if defined:  # both means over the same images: those with a map
        assert 0.0 <= result["mass_share"] <= 1.0
        assert result["mass_share"] == pytest.approx(np.mean([r["mass"] for r in defined]))
        assert result["area_share"] == pytest.approx(np.mean([r["area"] for r in defined]))
        assert result["ratio"] == pytest.approx(result["mass_share"] / result["area_share"])
    else:
        assert math.isnan(result["mass_share"]) and math.isnan(result["ratio"])


@pytest.mark.slow
def test_disc_mass_share_of_constructed_maps(run, replica, meta, monkeypatch):
    """Maps that are 1 inside each image's disc give a mass share of 1; uniform maps give the
    area share (ratio 1): the maps meet the masks of their own images."""
    dataset, picks = glaucoma_images(replica, meta)
    inputs = [(dataset[index]["inputs"], mask) for index, _, mask in picks]

    def disc_maps(model, images, task, classes, layer):
        assert task == "diagnosis" and list(classes) == [1]
        found = [next(m for x, m in inputs if torch.equal(x, image)) for image in images]
        return SimpleNamespace(maps=torch.from_numpy(np.stack(found)).float()[:, None])

    monkeypatch.setattr(cam_disc, "grad_cam", disc_maps)
    result = disc_mass_share(run, batch_size=2)
    assert [r["mass"] for r in result["per_image"]] == pytest.approx([1.0] * len(picks))
    assert result["mass_share"] == pytest.approx(1.0)
    assert result["ratio"] == pytest.approx(1.0 / result["area_share"])

    def uniform_maps(model, images, task, classes, layer):
        return SimpleNamespace(maps=torch.full((len(images), 1, *images.shape[-2:]), 0.5))

    monkeypatch.setattr(cam_disc, "grad_cam", uniform_maps)
    result = disc_mass_share(run)
    assert result["mass_share"] == pytest.approx(result["area_share"])
    assert result["ratio"] == pytest.approx(1.0)


@pytest.mark.slow
def test_disc_mass_share_needs_the_replica_meta_table(run, replica):
    table = replica / META_FILE
    hidden = table.with_name("hidden_meta.csv")
    table.rename(hidden)
    try:
        with pytest.raises(DataError, match=re.escape(f"{table}: not found")):
            disc_mass_share(run)
    finally:
        hidden.rename(table)


@pytest.mark.slow
def test_a_class_the_task_does_not_have_is_named(run):
    with pytest.raises(ConfigError, match="no class 'X' in task 'diagnosis'"):
        disc_mass_share(run, label="X")
