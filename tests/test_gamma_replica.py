"""The GAMMA replica: what it writes, its evidence model and its ideal-observer ceilings."""

import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from moekit.data.gamma import LAYOUT, read_grades
from moekit.data.replicas.gamma import (
    TRUTH_FILE,
    GammaEvidence,
    disc_field_geometry,
    make_gamma_replica,
    oracle_ceilings,
    quadratic_kappa,
)
from moekit.data.replicas.oct import LAYERS, RetinaAnatomy, paint_oct_volume
from moekit.errors import DataError


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    root = tmp_path_factory.mktemp("gamma_replica")
    return make_gamma_replica(
        root, n_train=12, num_bscans=6, fundus_size=(192, 128), oct_size=(32, 64), seed=1
    )


@pytest.fixture(scope="module")
def truth(replica):
    return pd.read_csv(replica / TRUTH_FILE, dtype={"id": str}, keep_default_na=False)


def test_writes_the_real_layout(replica, truth):
    grades = read_grades(LAYOUT.grades_table(replica, "train"))
    graded = truth[truth.grade != ""]
    assert grades == {pid: int(g) for pid, g in zip(graded.id, graded.grade)}
    pid = graded.id.iloc[0]
    photo = Image.open(LAYOUT.fundus(replica, "train", pid))
    assert photo.format == "JPEG" and photo.size == (192, 128) and photo.mode == "RGB"
    scans = sorted(LAYOUT.oct_dir(replica, "train", pid).iterdir())
    assert len(scans) == 6 and {p.name for p in scans} == {f"{k}_image.jpg" for k in range(6)}
    scan = Image.open(scans[0])
    assert scan.mode == "L" and scan.size == (32, 64)
    masked = truth[truth.has_mask.astype(bool)]
    assert len(masked) == round(0.8 * 12) + round(0.1 * 12)
    mask = Image.open(LAYOUT.mask(replica, "train", masked.id.iloc[0]))
    assert mask.format == "BMP" and set(np.unique(np.asarray(mask))) == {0, 128, 255}


def test_mask_cup_to_disc_ratio_is_the_drawn_one(replica, truth):
    for _, row in truth[truth.has_mask.astype(bool)].iterrows():
        grey = np.asarray(Image.open(LAYOUT.mask(replica, "train", row.id)))
        rows_with = lambda m: np.flatnonzero(m.any(axis=1))  # noqa: E731
        disc, cup = rows_with(grey < 192), rows_with(grey < 64)
        ratio = (cup[-1] - cup[0] + 1) / (disc[-1] - disc[0] + 1)
        assert ratio == pytest.approx(row.cdr, abs=0.12)


def test_segmentation_photo_is_the_grading_photo(replica, truth):
    both = truth[(truth.grade != "") & truth.has_mask.astype(bool)].id.iloc[0]
    seg = LAYOUT.seg_image(replica, "train", both).read_bytes()
    assert seg == LAYOUT.fundus(replica, "train", both).read_bytes()


def test_existing_replica_is_not_overwritten(replica):
    with pytest.raises(DataError, match="already exists"):
        make_gamma_replica(replica, n_train=1)


def test_evidence_shares_and_conditional_means():
    evidence = GammaEvidence()
    latents = evidence.sample(np.random.default_rng(0), 60_000)
    fundus_bad = ~latents["fundus_informative"]
    oct_bad = ~latents["oct_informative"]
    assert not (fundus_bad & oct_bad).any()
    assert fundus_bad.mean() == pytest.approx(0.25, abs=0.01)
    assert oct_bad.mean() == pytest.approx(0.25, abs=0.01)
    for g in range(3):
        good = (latents["grade"] == g) & ~fundus_bad
        assert latents["cdr"][good].mean() == pytest.approx(evidence.cdr_mean[g], abs=0.005)
        good = (latents["grade"] == g) & ~oct_bad
        assert latents["rnfl"][good].mean() == pytest.approx(evidence.rnfl_mean[g], abs=0.005)
    # a degraded modality's evidence does not depend on the grade
    for key, bad in (("cdr", fundus_bad), ("rnfl", oct_bad)):
        means = [latents[key][bad & (latents["grade"] == g)].mean() for g in range(3)]
        assert max(means) - min(means) < 0.01


def _loop_decision(prior, evidence_terms):
    """argmax_g log prior_g + Σ log N(x; μ_g, σ), in plain Python."""
    best, best_score = 0, -math.inf
    for g in range(3):
        score = math.log(prior[g])
        for x, means, sd in evidence_terms:
            score += -((x - means[g]) ** 2) / (2 * sd**2)
        if score > best_score:
            best, best_score = g, score
    return best


def test_oracle_ceilings_match_a_plain_loop():
    evidence = GammaEvidence()
    n, seed = 3000, 4
    ceilings = oracle_ceilings(evidence, n, seed)
    lat = evidence.sample(np.random.default_rng(seed), n)
    prior = [p / sum(evidence.prior) for p in evidence.prior]
    fundus = (evidence.cdr_mean, evidence.cdr_sd)
    oct_ = (evidence.rnfl_mean, evidence.rnfl_sd)
    correct = {name: 0 for name in ceilings}
    preds = {name: [] for name in ceilings}
    for i in range(n):
        cdr = (float(lat["cdr"][i]), *fundus)
        rnfl = (float(lat["rnfl"][i]), *oct_)
        f_ok, o_ok = bool(lat["fundus_informative"][i]), bool(lat["oct_informative"][i])
        decisions = {
            "fundus": _loop_decision(prior, [cdr] if f_ok else []),
            "oct": _loop_decision(prior, [rnfl] if o_ok else []),
            "per_patient_fusion": _loop_decision(
                prior, [t for t, ok in ((cdr, f_ok), (rnfl, o_ok)) if ok]
            ),
            "fixed_fusion": _loop_decision(prior, [cdr, rnfl]),
        }
        for name, decision in decisions.items():
            correct[name] += decision == int(lat["grade"][i])
            preds[name].append(decision)
    for name, scores in ceilings.items():
        assert scores["accuracy"] == pytest.approx(correct[name] / n)
        kappa = quadratic_kappa(lat["grade"], np.array(preds[name]), 3)
        assert scores["kappa"] == pytest.approx(kappa)
    assert ceilings["per_patient_fusion"]["accuracy"] > max(
        ceilings[k]["accuracy"] for k in ("fundus", "oct", "fixed_fusion")
    )


def test_quadratic_kappa_matches_the_formula():
    rng = np.random.default_rng(0)
    target, pred = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
    observed = np.zeros((3, 3))
    for t, p in zip(target, pred):
        observed[t, p] += 1
    expected = np.outer(observed.sum(1), observed.sum(0)) / 200
    weight = np.array([[(i - j) ** 2 / 4 for j in range(3)] for i in range(3)])
    reference = 1 - (weight * observed).sum() / (weight * expected).sum()
    assert quadratic_kappa(target, pred, 3) == pytest.approx(reference)


def test_rnfl_thickness_shows_in_the_bscans():
    """Mean brightness of the inner retina grows with the RNFL factor (the bright top band)."""
    levels = []
    for rnfl in (0.6, 1.0, 1.3):
        rng = np.random.default_rng(0)
        anatomy = RetinaAnatomy.sample(rng, rnfl, 1.0)
        volume = paint_oct_volume(rng, anatomy, 4, 64, 128).astype(float)
        levels.append(volume.mean())
    assert levels[0] < levels[1] < levels[2]
    assert LAYERS[0][0] == "RNFL"


def test_degraded_volume_is_dimmer_and_noisier():
    rng = np.random.default_rng(0)
    anatomy = RetinaAnatomy.sample(rng, 1.0, -1.0)
    clean = paint_oct_volume(np.random.default_rng(1), anatomy, 3, 32, 64).astype(float)
    noisy = paint_oct_volume(np.random.default_rng(1), anatomy, 3, 32, 64, degraded=True)
    assert noisy.astype(float)[:, 30:50].mean() < clean[:, 30:50].mean()
    assert clean.shape == noisy.shape == (3, 64, 32) and noisy.dtype == np.uint8


def test_disc_field_centres_a_large_disc_and_full_field_keeps_the_release_framing(tmp_path):
    """The default photograph is a 15° field around the optic disc: the disc mask is a large
    blob near the centre (over a third of the frame's height); the full field's disc is a
    small one anywhere in the field."""
    rng = np.random.default_rng(3)
    for _ in range(20):
        geometry = disc_field_geometry(rng, 64, 64, cup_ratio=0.5)
        assert 0.38 < geometry.disc_radius / geometry.radius < 0.62
        assert math.dist(geometry.disc_center, (32, 32)) < 0.25 * geometry.radius
    full = make_gamma_replica(
        tmp_path / "full", n_train=3, num_bscans=2, field="full", seg_fraction=1.0, seed=2
    )
    disc = make_gamma_replica(tmp_path / "disc", n_train=3, num_bscans=2, seg_fraction=1.0, seed=2)
    assert Image.open(LAYOUT.fundus(full, "train", "0001")).size == (384, 256)
    assert Image.open(LAYOUT.fundus(disc, "train", "0001")).size == (256, 256)
    for root, low, high in ((full, 0.0, 0.3), (disc, 0.35, 1.0)):
        grey = np.asarray(Image.open(LAYOUT.mask(root, "train", "0001")))
        rows = np.flatnonzero((grey < 192).any(axis=1))
        assert low < (rows[-1] - rows[0] + 1) / grey.shape[0] < high
    with pytest.raises(DataError, match="field must be one of disc, full"):
        make_gamma_replica(tmp_path / "bad", n_train=1, field="macula")
