"""Write a synthetic IDRiD replica in exactly the layout of the real download.

``make_idrid_replica(root)`` writes procedurally painted fundus photographs
(:mod:`moekit.data.replicas.fundus`) where the IDRiD loader expects the real ones:

* JPEG images ``IDRiD_001.jpg`` … for grading (ids restart at 001 in the test split) and
  ``IDRiD_01.jpg`` … for segmentation (test ids continue after the training ids, as in the
  real release: 54 training images, test ``IDRiD_55`` … ``IDRiD_81``);
* the two grading CSVs with the real header ``Image name,Retinopathy grade,Risk of macular
  edema ,,`` (trailing space, two empty trailing columns) and rows like ``IDRiD_001,2,1,,``;
* one TIFF mask per present lesion, cycling through the modes of the releases (palette ``P``
  with indices 0/1, 1-bit, 8-bit 0/255), and the last test image's ``EX`` mask as RGBA with the
  lesion in the red channel and alpha 255 everywhere (the real ``IDRiD_81_EX.tif``);
* masks absent in about the real proportions: a soft-exudate mask for half of the images
  (26/54 and 14/27 in the release), one training image without haemorrhages (53/54); an
  absent mask means the lesion is absent from the image.

Grading labels follow from what was painted, so the grading is learnable:
:func:`retinopathy_grade` counts microaneurysms, haemorrhages and exudates, and
:func:`macular_edema_risk` measures the exudates' distance to the macula (ETDRS-style: an
exudate within one disc diameter of the macula's centre is risk 2). Grades are drawn from the
release's training distribution and the lesion load is painted to match.

Unlike the release, whose photographs all come from one camera, each photograph comes from one
of the painter's cameras (:data:`CAMERA_MIX`: IDRiD's clipped circle for 40 %, whole circles
in other frames, a small portable field...), framed at the camera's aspect ratio and saved at
its JPEG quality, so that a model trained on the replica meets the framings of other data sets
(see ``docs/datasets.md``, "What the replica imitates and what it does not").

Everything is a function of ``seed``: image ``i`` of a split and source has its own random
stream, so a larger replica starts with the same images as a smaller one.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from moekit.data.idrid import LAYOUT
from moekit.data.replicas.fundus import CAMERAS, LESIONS, FundusGeometry, FundusPainter
from moekit.errors import ConfigError, DataError

RG_PRIOR = (134, 20, 136, 74, 49)
"""Retinopathy grades 0–4 among IDRiD's 413 training images."""
MER_PRIOR_WITH_DR = (0.3, 0.2, 0.5)
"""Risk of macular edema 0–2 given retinopathy grade >= 2 (no exudates below grade 2)."""
MASK_MODES = ("P", "1", "L")
CSV_HEADER = ["Image name", "Retinopathy grade", "Risk of macular edema ", "", ""]
CAMERA_MIX = {
    "idrid": 0.4,
    "circle_3_2": 0.15,
    "circle_4_3": 0.15,
    "square": 0.1,
    "portable": 0.1,
    "wide_clipped": 0.1,
}
"""Share of each camera (:data:`moekit.data.replicas.fundus.CAMERAS`) among the photographs:
IDRiD's own framing and five others, so that a model trained on the replica meets the fields
of other cameras (brought to one geometry by the ``fundus_fov`` preprocessing)."""
_SOURCE_CODES = {"grading": 0, "segmentation": 1}
_SPLIT_CODES = {"train": 0, "test": 1}


def retinopathy_grade(n_ma: int, n_he: int, n_ex: int) -> int:
    """The replica's grading rule: 0 none, 1 MA only, 2 up to 4 HE (or any EX), 3 5–11 HE, 4 ≥12.

    (Grade 4 images are also painted with neovascularisation on the disc.)
    """
    if n_he >= 12:
        return 4
    if n_he >= 5:
        return 3
    if n_he >= 1 or n_ex >= 1:
        return 2
    return 1 if n_ma >= 1 else 0


def macular_edema_risk(
    exudates: Sequence[tuple[float, float]], macula: tuple[float, float], disc_diameter: float
) -> int:
    """0 without exudates, 2 if one lies within one disc diameter of the macula, else 1."""
    if not exudates:
        return 0
    nearest = min(np.hypot(x - macula[0], y - macula[1]) for x, y in exudates)
    return 2 if nearest <= disc_diameter else 1


@dataclass(frozen=True)
class LesionPlan:
    """How many lesions of each kind to paint; exudate clusters are ``near`` or ``far``."""

    microaneurysms: int = 0
    haemorrhages: int = 0
    exudate_clusters: tuple[str, ...] = ()
    soft_exudates: int = 0
    neovascular: bool = False


def plan_for_grade(rng: np.random.Generator, grade: int, mer: int) -> LesionPlan:
    """A lesion load whose :func:`retinopathy_grade` is ``grade`` (and exudates for ``mer``)."""
    ma_low, ma_high = ((0, 0), (2, 7), (3, 10), (6, 14), (8, 16))[grade]
    he_low, he_high = ((0, 0), (0, 0), (1, 4), (5, 11), (12, 20))[grade]
    clusters: tuple[str, ...] = ()
    if mer:
        far = ("far",) * int(rng.integers(0, 3))
        clusters = ("near", *far) if mer == 2 else ("far",) * int(rng.integers(1, 4))
    return LesionPlan(
        microaneurysms=int(rng.integers(ma_low, ma_high + 1)),
        haemorrhages=int(rng.integers(he_low, he_high + 1)),
        exudate_clusters=clusters,
        soft_exudates=int(rng.integers(1, 4)) if grade >= 3 and rng.random() < 0.5 else 0,
        neovascular=grade == 4,
    )


def plan_segmentation(rng: np.random.Generator, with_he: bool, with_se: bool) -> LesionPlan:
    """The lesion load of a segmentation image (all of IDRiD's show MA, EX and the disc)."""
    grade = int(rng.choice([2, 3, 4], p=[0.4, 0.35, 0.25]))
    plan = plan_for_grade(rng, grade, int(rng.choice([1, 2])))
    return LesionPlan(
        microaneurysms=max(3, plan.microaneurysms),
        haemorrhages=plan.haemorrhages if with_he else 0,
        exudate_clusters=plan.exudate_clusters,
        soft_exudates=int(rng.integers(1, 5)) if with_se else 0,
        neovascular=plan.neovascular and with_he,
    )


@dataclass
class Painted:
    """One painted photograph with its masks, grading labels and the JPEG quality its camera
    saves it with."""

    image: np.ndarray
    masks: dict[str, np.ndarray]
    rg: int
    mer: int
    jpeg_quality: int = 92


def frame_size(size: tuple[int, int], camera: str) -> tuple[int, int]:
    """``(width, height)`` of a ``camera``'s frame: ``size`` for IDRiD's camera, else
    ``size``'s height at the camera's aspect ratio."""
    if camera == "idrid":
        return size
    return max(32, round(size[1] * CAMERAS[camera].aspect)), size[1]


def paint(
    rng: np.random.Generator, size: tuple[int, int], plan: LesionPlan, camera: str = "idrid"
) -> Painted:
    """Paint a photograph of ``camera`` (frame :func:`frame_size`) with ``plan``'s lesions."""
    geometry = FundusGeometry.sample(rng, *frame_size(size, camera), camera=camera)
    painter = FundusPainter(geometry, rng)
    painter.paint_anatomy()
    if plan.neovascular:
        painter.add_neovascularisation()
    painter.add_soft_exudates(plan.soft_exudates)
    haemorrhages = painter.add_haemorrhages(plan.haemorrhages)
    microaneurysms = painter.add_microaneurysms(plan.microaneurysms)
    dd = geometry.disc_diameter
    exudates: list[tuple[float, float]] = []
    for kind in plan.exudate_clusters:
        far = dd + 0.15 * geometry.radius  # every speck (spread 0.08 radii) beyond 1 DD
        low, high = (
            (0.0, 0.5 * dd)
            if kind == "near"
            else (far, max(far, 0.6 * geometry.radius) + 0.15 * geometry.radius)
        )
        centre = painter.point_around(geometry.macula_center, low, high)
        exudates += painter.add_exudate_cluster(centre)
    image, masks = painter.finish()
    rg = retinopathy_grade(len(microaneurysms), len(haemorrhages), len(exudates))
    mer = macular_edema_risk(exudates, geometry.macula_center, dd)
    quality = int(rng.integers(painter.camera.jpeg_quality[0], painter.camera.jpeg_quality[1] + 1))
    return Painted(image, masks, rg, mer, quality)


def draw_camera(rng: np.random.Generator, cameras: Mapping[str, float]) -> str:
    """A camera name drawn with probabilities proportional to ``cameras``' values."""
    names = list(cameras)
    weights = np.array([cameras[n] for n in names], np.float64)
    return names[int(rng.choice(len(names), p=weights / weights.sum()))]


def _rng(seed: int, split: str, source: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLIT_CODES[split], _SOURCE_CODES[source], index])


def _jpeg(image: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def mask_tiff(mask: np.ndarray, mode: str) -> bytes:
    """Encode a 0/1 mask as a TIFF: mode ``P`` (indices 0/1), ``1``, ``L`` (0/255) or ``RGBA``."""
    if mode == "P":
        img = Image.fromarray(mask.astype(np.uint8))
        img.putpalette([0, 0, 0, 255, 0, 0])
    elif mode == "1":
        img = Image.fromarray(mask.astype(bool))
    elif mode == "L":
        img = Image.fromarray(mask.astype(np.uint8) * 255)
    elif mode == "RGBA":
        red = mask.astype(np.uint8) * 255
        zero = np.zeros_like(red)
        img = Image.fromarray(np.dstack([red, zero, zero, np.full_like(red, 255)]))
    else:
        raise ValueError(f"unsupported mask mode {mode!r}")
    buffer = io.BytesIO()
    img.save(buffer, format="TIFF", compression="tiff_lzw")
    return buffer.getvalue()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _write_grading(
    root: Path,
    split: str,
    count: int,
    size: tuple[int, int],
    seed: int,
    cameras: Mapping[str, float],
) -> None:
    folder = LAYOUT.grading_images(root, split)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(1, count + 1):
        rng = _rng(seed, split, "grading", i)
        camera = draw_camera(rng, cameras)
        grade = int(rng.choice(5, p=np.array(RG_PRIOR) / sum(RG_PRIOR)))
        mer = int(rng.choice(3, p=MER_PRIOR_WITH_DR)) if grade >= 2 else 0
        painted = paint(rng, size, plan_for_grade(rng, grade, mer), camera)
        image_id = f"IDRiD_{i:03d}"
        _write(folder / f"{image_id}.jpg", _jpeg(painted.image, painted.jpeg_quality))
        rows.append([image_id, painted.rg, painted.mer, "", ""])
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows([CSV_HEADER, *rows])
    _write(LAYOUT.grading_csv(root, split), text.getvalue().encode())


def _write_segmentation(
    root: Path,
    split: str,
    ids: Sequence[int],
    size: tuple[int, int],
    seed: int,
    cameras: Mapping[str, float],
) -> None:
    folder = LAYOUT.segmentation_images(root, split)
    folder.mkdir(parents=True, exist_ok=True)
    for lesion in LESIONS:
        LAYOUT.mask_dir(root, split, lesion).mkdir(parents=True, exist_ok=True)
    pick = np.random.default_rng([seed, _SPLIT_CODES[split], 7])
    with_se = set(pick.permutation(len(ids))[: round(len(ids) / 2)].tolist())
    one_without_he = split == "train" and len(ids) >= 4
    without_he = set(pick.permutation(len(ids))[:1].tolist()) if one_without_he else set()
    for n, number in enumerate(ids):
        rng = _rng(seed, split, "segmentation", number)
        camera = draw_camera(rng, cameras)
        plan = plan_segmentation(rng, with_he=n not in without_he, with_se=n in with_se)
        painted = paint(rng, size, plan, camera)
        image_id = f"IDRiD_{number:02d}"
        _write(folder / f"{image_id}.jpg", _jpeg(painted.image, painted.jpeg_quality))
        present = {"HE": n not in without_he, "SE": n in with_se}
        for k, lesion in enumerate(LESIONS):
            if not present.get(lesion, True):
                continue
            mode = MASK_MODES[(number + k) % len(MASK_MODES)]
            if split == "test" and lesion == "EX" and number == ids[-1]:
                mode = "RGBA"
            path = LAYOUT.mask_path(root, split, image_id, lesion)
            _write(path, mask_tiff(painted.masks[lesion], mode))


def make_idrid_replica(
    root: str | Path,
    n_grading_train: int = 60,
    n_grading_test: int = 15,
    n_seg_train: int = 24,
    n_seg_test: int = 12,
    size: tuple[int, int] = (384, 256),
    seed: int = 0,
    cameras: Mapping[str, float] | None = None,
) -> Path:
    """Write a synthetic IDRiD download under ``root`` (which must not hold one already).

    Args:
        root: the folder to create; it will hold ``A. Segmentation`` and ``B. Disease Grading``.
        n_grading_train, n_grading_test: grading images per split (the release: 413 / 103).
        n_seg_train, n_seg_test: segmentation images per split (the release: 54 / 27).
        size: ``(width, height)`` of the photographs of IDRiD's camera (the release:
            4288×2848); the other cameras' frames have its height and their aspect ratio.
        seed: everything drawn is a function of it.
        cameras: ``{camera name: weight}``, the share of each camera (default
            :data:`CAMERA_MIX`; ``{"idrid": 1}`` for IDRiD's framing only).

    Returns:
        ``root``.
    """
    root = Path(root)
    width, height = (int(s) for s in size)
    if width < 32 or height < 32:
        raise DataError(f"{root}: replica images must be at least 32x32, got {width}x{height}")
    for part in (LAYOUT.segmentation, LAYOUT.grading):
        if (root / part).exists():
            raise DataError(f"{root / part}: already exists; remove it or choose another folder")
    cameras = dict(CAMERA_MIX if cameras is None else cameras)
    unknown = [name for name in cameras if name not in CAMERAS]
    if unknown or not cameras or min(cameras.values()) < 0 or sum(cameras.values()) <= 0:
        raise ConfigError(
            f"cameras: expected positive weights of {', '.join(CAMERAS)}, got {cameras}"
        )
    counts = (n_grading_train, n_grading_test, n_seg_train, n_seg_test)
    if min(counts) < 0 or n_grading_train + n_seg_train < 1:
        raise DataError(f"{root}: replica image counts must be >= 0 with some training images")
    for split, count in (("train", n_grading_train), ("test", n_grading_test)):
        _write_grading(root, split, count, (width, height), seed, cameras)
    seg_ids = {
        "train": range(1, n_seg_train + 1),
        "test": range(n_seg_train + 1, n_seg_train + n_seg_test + 1),
    }
    for split, ids in seg_ids.items():
        _write_segmentation(root, split, list(ids), (width, height), seed, cameras)
    return root
